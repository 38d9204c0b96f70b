"""The DICOM listener, with real pynetdicom peers on 127.0.0.1.

First the C-STORE SCP on its own (in this process: statuses, spool files, job rows), then the
whole service as a `pacs-ai serve` subprocess: modality -> service -> PACS.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, RLELossless, generate_uid)
from pynetdicom import AE

from pacs_ai.config import parse_config
from pacs_ai.jobs import JobStore
from pacs_ai.pixels import display_array
from pacs_ai.scp import StorageSCP
from pacs_ai.spool import Spool
from tests.dicom_peers import (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION_STORAGE,
                               DX_FOR_PROCESSING_STORAGE, LOCALHOST, SimulatedModality, free_port,
                               synthetic_radiograph, wait_until, write_raw_file)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class Listener:
    """A StorageSCP on a free port with its own spool and queue (no model, no workers)."""

    def __init__(self, folder: Path, **tables):
        settings = {"listener": {"host": LOCALHOST, "port": free_port()},
                    "storage": {"spool_dir": str(folder / "spool"), "min_free_bytes": 0},
                    "limits": {"shutdown_grace_seconds": 2}}
        for table, values in tables.items():
            settings.setdefault(table, {}).update(values)
        self.config = parse_config(settings, base_dir=folder)
        self.spool = Spool(self.config.storage.spool_dir)
        self.spool.prepare()
        self.store = JobStore.open(self.spool.db_path)
        self.scp = StorageSCP(self.config, self.spool, self.store)
        self.scp.start()
        self.port = self.scp.port

    def modality(self, **kwargs) -> SimulatedModality:
        return SimulatedModality(self.port, **kwargs)

    def close(self) -> None:
        self.scp.stop(2)
        self.store.close()


@pytest.fixture
def listener(tmp_path):
    listener = Listener(tmp_path)
    yield listener
    listener.close()


def test_echo(listener):
    assert listener.modality().echo() == 0x0000


@pytest.mark.parametrize("sop_class", [CR_IMAGE_STORAGE, DX_FOR_PRESENTATION_STORAGE,
                                       DX_FOR_PROCESSING_STORAGE])
def test_store_is_durable_and_recorded_before_success(listener, sop_class):
    ds = synthetic_radiograph(sop_class_uid=sop_class, seed=3)
    [result] = listener.modality().send([ds])
    assert result.status == 0x0000
    job = listener.store.find(ds.SOPInstanceUID)
    assert job is not None and job.state == "pending"
    assert job.sop_class_uid == sop_class and job.study_instance_uid == ds.StudyInstanceUID
    assert job.calling_ae_title == "MODALITY"
    stored = pydicom.dcmread(listener.spool.resolve(job.image_file))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    assert list(listener.spool.incoming.iterdir()) == []


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                                    RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_transfer_syntaxes_are_accepted_and_decode_to_the_same_picture(listener, syntax):
    original = synthetic_radiograph(seed=5)
    ds = synthetic_radiograph(seed=5, transfer_syntax=syntax)
    [result] = listener.modality().send([ds])
    assert result.status == 0x0000
    stored = pydicom.dcmread(listener.spool.resolve(listener.store.find(ds.SOPInstanceUID).image_file))
    assert stored.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(display_array(stored), display_array(original))


def test_same_instance_twice_is_one_job(listener):
    ds = synthetic_radiograph(seed=1)
    results = listener.modality().send([ds, ds])
    results += listener.modality().send([ds])
    assert [r.status for r in results] == [0, 0, 0]
    assert listener.store.job_counts()["pending"] == 1
    assert len(list(listener.spool.images.iterdir())) == 1


def test_unlisted_sop_class_is_not_accepted(listener):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE)
    ae.add_requested_context(CR_IMAGE_STORAGE)
    association = ae.associate(LOCALHOST, listener.port, ae_title="PACS_AI")
    try:
        assert association.is_established
        accepted = {cx.abstract_syntax for cx in association.accepted_contexts}
        assert CR_IMAGE_STORAGE in accepted and CT_IMAGE_STORAGE not in accepted
    finally:
        association.release()


def test_calling_ae_titles_outside_the_allow_list_are_rejected(tmp_path):
    listener = Listener(tmp_path, listener={"allowed_calling_ae_titles": ["CR_ROOM_1"]})
    try:
        assert not listener.modality(calling_ae_title="INTRUDER").association_accepted()
        [refused] = listener.modality(calling_ae_title="INTRUDER").send([synthetic_radiograph()])
        assert refused.status is None
        [stored] = listener.modality(calling_ae_title="CR_ROOM_1").send([synthetic_radiograph()])
        assert stored.status == 0x0000
        assert len(listener.store.all_jobs()) == 1
    finally:
        listener.close()


def test_below_the_disk_floor_answers_out_of_resources_and_writes_nothing(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    import shutil
    floor = shutil.disk_usage(spool).free + 10**12  # always above what is free
    listener = Listener(tmp_path, storage={"min_free_bytes": floor})
    try:
        [result] = listener.modality().send([synthetic_radiograph()])
        assert result.status == 0xA700
        assert "disk-full" in result.error_comment
        assert listener.store.all_jobs() == []
        assert list(listener.spool.images.iterdir()) == []
        assert list(listener.spool.incoming.iterdir()) == []
    finally:
        listener.close()


def test_unparseable_dataset_is_refused_as_cannot_understand(listener, tmp_path):
    uid = generate_uid()
    corrupt = write_raw_file(tmp_path / "corrupt.dcm", sop_class_uid=CR_IMAGE_STORAGE,
                             sop_instance_uid=uid, transfer_syntax=DeflatedExplicitVRLittleEndian,
                             body=b"this is not a deflate stream" * 10)
    result = listener.modality().send_file_as_is(corrupt)
    assert result.status is not None and 0xC000 <= result.status <= 0xCFFF
    assert listener.store.all_jobs() == []
    assert list(listener.spool.images.iterdir()) == []


def test_dataset_not_matching_the_request_is_refused(listener, tmp_path):
    ds = synthetic_radiograph()
    inner = pydicom.filebase.DicomBytesIO()
    inner.is_little_endian, inner.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(inner, ds)  # the dataset alone, without file meta
    mismatched = write_raw_file(tmp_path / "mismatch.dcm", sop_class_uid=CR_IMAGE_STORAGE,
                                sop_instance_uid=generate_uid(),  # not the dataset's own UID
                                transfer_syntax=ExplicitVRLittleEndian, body=inner.getvalue())
    result = listener.modality().send_file_as_is(mismatched)
    assert result.status == 0xC001
    assert listener.store.all_jobs() == []


def test_association_limit_rejects_extra_peers(tmp_path):
    listener = Listener(tmp_path, limits={"max_associations": 1})
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(CR_IMAGE_STORAGE)
        held = ae.associate(LOCALHOST, listener.port, ae_title="PACS_AI")
        assert held.is_established
        try:
            assert not listener.modality().association_accepted()
        finally:
            held.release()
        assert wait_until(lambda: listener.modality().association_accepted(), 10)
    finally:
        listener.close()


def test_bad_peers_leave_no_threads_behind(tmp_path):
    """Peers that connect and send garbage or nothing hold at most a bounded number of threads,
    and every one of them ends (ACSE/network timeout), leaving none behind."""
    listener = Listener(tmp_path, limits={"max_associations": 3, "acse_timeout_seconds": 1,
                                          "network_timeout_seconds": 1})
    try:
        listener.modality().echo()
        assert wait_until(lambda: not listener.scp._server.active_associations, 10)
        baseline = threading.active_count()
        peers = []
        for index in range(15):
            peer = socket.create_connection((LOCALHOST, listener.port), timeout=5)
            if index % 2:
                peer.sendall(b"\x07\x00garbage that is not a PDU" * 3)
            peers.append(peer)
        time.sleep(0.5)
        assert len(listener.scp._server.active_associations) <= 6  # 2 x max_associations
        assert threading.active_count() <= baseline + 2 * 6  # association + DUL thread each
        # The peers stay connected and silent: the network timeout must still free the threads.
        assert wait_until(lambda: threading.active_count() <= baseline, 15)
        for peer in peers:
            peer.close()
        assert listener.modality().echo() == 0x0000
    finally:
        listener.close()


def test_stop_lets_a_running_association_finish(listener):
    """Graceful stop: an association in progress completes its C-STOREs before shutdown."""
    datasets = [synthetic_radiograph(seed=n) for n in range(6)]
    results = []
    sender = threading.Thread(target=lambda: results.extend(listener.modality().send(datasets)))
    sender.start()
    assert wait_until(lambda: len(listener.store.all_jobs()) >= 1, 15)
    listener.scp.stop(10)
    sender.join(timeout=30)
    acknowledged = {r.sop_instance_uid for r in results if r.acknowledged}
    recorded = {job.sop_instance_uid for job in listener.store.all_jobs()}
    assert acknowledged <= recorded  # nothing acknowledged is missing
    assert not _port_open(listener.port)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return True
    except OSError:
        return False
