"""The DICOM listener, with real pynetdicom peers on 127.0.0.1.

First the C-STORE SCP on its own (in this process: statuses, spool files, job rows), then the
whole service as a `pacs-ai serve` subprocess: modality -> service -> PACS.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog.testing
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, RLELossless, generate_uid)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs_ai.film.pixels import display_array
from testbed.dicom_peers import (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION_STORAGE,
                                 DX_FOR_PROCESSING_STORAGE, LOCALHOST, RecordingPacs,
                                 SimulatedModality, free_port, port_open, synthetic_radiograph,
                                 wait_until)
from testbed.job_queue import all_jobs
from testbed.listener import Listener
from tests.hostile_input import (associate_rq, closed_by_peer, connect_burst, corrupt_pixel_data,
                                 declaring, deflate_bomb, raw_connection, read_pdu,
                                 silent_connections, undecodable, write_raw_part10)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


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
        assert len(all_jobs(listener.store)) == 1
    finally:
        listener.close()


def rejected_count(reason: str) -> float:
    from pacs_ai.ops.metrics import REGISTRY

    return REGISTRY.get_sample_value("pacs_ai_rejected_total", {"reason": reason}) or 0.0


@pytest.mark.real_peer
def test_an_association_to_another_called_ae_title_is_rejected(listener):
    """Issue 14: `echoscu -aec NOTME` succeeded; the called AE title was never checked."""
    from testbed.real_peers import echoscu

    before = rejected_count("called-ae-not-recognised")
    with structlog.testing.capture_logs() as events:
        wrong = echoscu(listener.port, called_ae="NOTME", calling_ae="MODALITY")
    assert wrong.returncode != 0
    output = wrong.stdout + wrong.stderr
    assert "Association Rejected" in output and "Rejected Permanent" in output
    assert "Called AE Title Not Recognized" in output, output
    [rejected] = [e for e in events if e["event"] == "association_rejected"]
    assert rejected["reason"] == "called-ae-not-recognised"
    assert rejected["called_ae_title"] == "NOTME" and rejected["calling_ae_title"] == "MODALITY"
    assert rejected_count("called-ae-not-recognised") == before + 1
    right = echoscu(listener.port, called_ae="PACS_AI", calling_ae="MODALITY")
    assert right.returncode == 0, right.stdout + right.stderr


@pytest.mark.real_peer
def test_a_calling_ae_title_bound_to_another_address_is_rejected(tmp_path):
    """Issue 14 item 6: an AE title bound to an address (like Orthanc's modality host check)
    is refused from any other, with the answer an unknown calling AE title gets."""
    from testbed.real_peers import echoscu

    listener = Listener(tmp_path, listener={"allowed_calling_ae_titles": [
        {"ae_title": "CR1", "address": "127.0.0.2/32"}, "MODALITY"]})
    try:
        before = rejected_count("calling-ae-wrong-address")
        with structlog.testing.capture_logs() as events:
            wrong = echoscu(listener.port, called_ae="PACS_AI", calling_ae="CR1")
        assert wrong.returncode != 0
        output = wrong.stdout + wrong.stderr
        assert "Rejected Permanent" in output and "Calling AE Title Not Recognized" in output, \
            output
        [rejected] = [e for e in events if e["event"] == "association_rejected"]
        assert rejected["reason"] == "calling-ae-wrong-address"
        assert rejected["calling_ae_title"] == "CR1" and rejected["peer"] == "127.0.0.1"
        assert rejected_count("calling-ae-wrong-address") == before + 1
        plain = echoscu(listener.port, called_ae="PACS_AI", calling_ae="MODALITY")
        assert plain.returncode == 0, plain.stdout + plain.stderr
    finally:
        listener.close()
    listener = Listener(tmp_path / "second", listener={"allowed_calling_ae_titles": [
        {"ae_title": "CR1", "address": "127.0.0.0/8"}]})
    try:
        right = echoscu(listener.port, called_ae="PACS_AI", calling_ae="CR1")
        assert right.returncode == 0, right.stdout + right.stderr
        unknown = echoscu(listener.port, called_ae="PACS_AI", calling_ae="OTHER")
        assert "Calling AE Title Not Recognized" in unknown.stdout + unknown.stderr
    finally:
        listener.close()


@pytest.mark.real_peer
def test_the_called_ae_title_check_can_be_turned_off(tmp_path):
    from testbed.real_peers import echoscu

    listener = Listener(tmp_path, listener={"check_called_ae_title": False})
    try:
        answered = echoscu(listener.port, called_ae="NOTME", calling_ae="MODALITY")
        assert answered.returncode == 0, answered.stdout + answered.stderr
    finally:
        listener.close()


@pytest.mark.real_peer
def test_an_association_offering_only_unaccepted_sop_classes_is_counted(listener, tmp_path):
    """Issue 14: a CT modality sending here had every presentation context refused, and
    nothing on our side said so."""
    from testbed.real_peers import propose_as_stored, storescu

    ct = synthetic_radiograph(sop_class_uid=CT_IMAGE_STORAGE, modality="CT", seed=4)
    path = tmp_path / "ct.dcm"
    ct.save_as(path, enforce_file_format=True)
    only_ct = propose_as_stored([path], tmp_path / "ct.cfg")  # as a CT scanner would
    before = rejected_count("no-acceptable-presentation-context")
    with structlog.testing.capture_logs() as events:
        sent = storescu(listener.port, [path], called_ae="PACS_AI", calling_ae="CT_ROOM",
                        extra=only_ct)
        assert wait_until(lambda: any(e["event"] == "association_rejected" for e in events), 5)
    assert "No presentation context" in sent.output or "No Acceptable" in sent.output, sent.output
    assert all_jobs(listener.store) == []
    [refused] = [e for e in events if e["event"] == "association_rejected"]
    assert refused["reason"] == "no-acceptable-presentation-context"
    assert refused["calling_ae_title"] == "CT_ROOM"
    assert CT_IMAGE_STORAGE in refused["offered_sop_classes"]
    assert rejected_count("no-acceptable-presentation-context") == before + 1
    # an association with one usable context among refused ones is not counted
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE)
    ae.add_requested_context(CR_IMAGE_STORAGE)
    association = ae.associate(LOCALHOST, listener.port, ae_title="PACS_AI")
    assert association.is_established
    association.release()
    assert rejected_count("no-acceptable-presentation-context") == before + 1


def test_peers_outside_the_allowed_addresses_are_disconnected(tmp_path):
    listener = Listener(tmp_path, listener={"allowed_peer_addresses": ["10.0.0.0/8"]})
    try:
        assert not listener.modality().association_accepted()
        assert all_jobs(listener.store) == []
    finally:
        listener.close()
    listener = Listener(tmp_path / "second", listener={"allowed_peer_addresses": ["127.0.0.1"]})
    try:
        assert listener.modality().echo() == 0x0000
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
        assert all_jobs(listener.store) == []
        assert list(listener.spool.images.iterdir()) == []
        assert list(listener.spool.incoming.iterdir()) == []
    finally:
        listener.close()


def test_unparseable_dataset_is_refused_as_cannot_understand(listener, tmp_path):
    uid = generate_uid()
    corrupt = write_raw_part10(tmp_path / "corrupt.dcm", sop_class_uid=CR_IMAGE_STORAGE,
                               sop_instance_uid=uid,
                               transfer_syntax_uid=DeflatedExplicitVRLittleEndian,
                               dataset_bytes=b"this is not a deflate stream" * 10)
    result = listener.modality().send_file_as_is(corrupt)
    assert result.status is not None and 0xC000 <= result.status <= 0xCFFF
    assert all_jobs(listener.store) == []
    assert list(listener.spool.images.iterdir()) == []


def test_dataset_not_matching_the_request_is_refused(listener, tmp_path):
    ds = synthetic_radiograph()
    inner = pydicom.filebase.DicomBytesIO()
    inner.is_little_endian, inner.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(inner, ds)  # the dataset alone, without file meta
    mismatched = write_raw_part10(tmp_path / "mismatch.dcm", sop_class_uid=CR_IMAGE_STORAGE,
                                  sop_instance_uid=generate_uid(),  # not the dataset's own UID
                                  transfer_syntax_uid=ExplicitVRLittleEndian,
                                  dataset_bytes=inner.getvalue())
    result = listener.modality().send_file_as_is(mismatched)
    assert result.status == 0xC001
    assert all_jobs(listener.store) == []


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


def test_a_burst_of_closed_connections_locks_nobody_out(listener):
    """Issue 14: 20 connects closed at once (a port scan, a TCP probe) held their slots until
    the ACSE timeout, and the next modality was refused (connection-limit) for 30 s."""
    connect_burst(listener.port, 20)
    assert wait_until(lambda: not listener.scp._server.active_associations, 1.0), \
        f"{len(listener.scp._server.active_associations)} closed connections still held"
    assert listener.modality().echo() == 0x0000


def test_connections_that_never_associate_are_dropped_after_the_request_timeout(tmp_path):
    listener = Listener(tmp_path, limits={"association_request_timeout_seconds": 1})
    try:
        held = listener.modality()._ae()
        held.add_requested_context(Verification)
        established = held.associate(LOCALHOST, listener.port, ae_title="PACS_AI")
        assert established.is_established
        started = time.monotonic()
        [silent] = silent_connections(listener.port, 1)
        stalled = socket.create_connection((LOCALHOST, listener.port), timeout=5)
        stalled.sendall(associate_rq(called_ae="PACS_AI")[:20])  # the rest never comes
        try:
            assert closed_by_peer(silent, 5) and closed_by_peer(stalled, 5)
            assert time.monotonic() - started < 3
        finally:
            silent.close()
            stalled.close()
        # an association, once requested, is not held to that timeout
        assert established.is_established
        assert established.send_c_echo().Status == 0x0000
        established.release()
        assert wait_until(lambda: not listener.scp._server.active_associations, 2)
    finally:
        listener.close()


def test_one_address_cannot_take_every_connection(tmp_path):
    """Connections are capped per peer address below the global cap, so a host holding idle
    connections leaves room for the others."""
    listener = Listener(tmp_path, limits={"max_associations": 2,
                                          "max_connections_per_address": 2})
    noisy = silent_connections(listener.port, 6, source="127.0.0.2")
    try:
        refused = [c for c in noisy if closed_by_peer(c, 0.5)]
        assert len(refused) == 4  # 2 admitted from 127.0.0.2; 4 (the global cap) in all
        assert listener.modality().echo() == 0x0000  # from 127.0.0.1
    finally:
        for connection in noisy:
            connection.close()
        listener.close()


LIMIT = 1024 * 1024  # [limits] max_dataset_bytes in the tests below


def test_a_deflated_dataset_inflating_past_the_limit_is_refused(tmp_path):
    """Issue 14: a 1 MB deflated store inflating to 1 GB was acknowledged (the listener grew
    by 2 GB). Inflation now stops at max_dataset_bytes with an error status."""
    listener = Listener(tmp_path, limits={"max_dataset_bytes": LIMIT})
    try:
        bomb = deflate_bomb(synthetic_radiograph(seed=2), tmp_path / "bomb.dcm",
                            inflated_bytes=8 * LIMIT)
        assert bomb.stat().st_size < LIMIT // 8
        result = listener.modality().send_file_as_is(bomb)
        assert result.status == 0xA700 and result.error_comment.startswith("dataset-too-large")
        fine = synthetic_radiograph(seed=2, transfer_syntax=DeflatedExplicitVRLittleEndian)
        assert listener.modality().send([fine])[0].status == 0x0000
        assert [job.sop_instance_uid for job in all_jobs(listener.store)] == [fine.SOPInstanceUID]
    finally:
        listener.close()



def test_a_deflated_header_is_held_no_further_than_the_head_limit(tmp_path):
    """Issue 23 item 2: a deflated dataset's header is kept while it is parsed, so bytes before
    Pixel Data are held up to HEAD_LIMIT_BYTES only (here 64 MiB of overlay ahead of a small
    film's pixels, within the default max_dataset_bytes): refused, and the listener's
    allocations stay within twice that limit (inflated and copied whole before: 128 MiB)."""
    import tracemalloc

    from pacs_ai.receive.inflation import HEAD_LIMIT_BYTES

    bomb = deflate_bomb(synthetic_radiograph(seed=4, rows=64, columns=64),
                        tmp_path / "overlay.dcm", inflated_bytes=4 * HEAD_LIMIT_BYTES,
                        bulk="overlay")
    listener = Listener(tmp_path)
    try:
        tracemalloc.start()
        try:
            result = listener.modality().send_file_as_is(bomb)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        print(f"{bomb.stat().st_size} bytes inflating to {4 * HEAD_LIMIT_BYTES} before Pixel "
              f"Data: {result}, peak traced {peak / 2**20:.1f} MiB")
        assert result.status == 0xA700
        assert result.error_comment == (f"dataset-too-large: more than {HEAD_LIMIT_BYTES} "
                                        "bytes before Pixel Data")
        assert peak < 2 * HEAD_LIMIT_BYTES
        assert all_jobs(listener.store) == []
    finally:
        listener.close()


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless,
                                    ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_a_film_declaring_more_than_max_pixels_is_refused_whatever_the_syntax(tmp_path, syntax):
    """Issue 23 item 3: a JPEG 2000 film whose header declares 60000 x 60000 pixels was answered
    Success, then its job failed too-large (the worker never decodes past [limits] max_pixels),
    so the modality forgot an image nobody would read. Now Rows x Columns x frames past the
    limit is refused while it is received, 0xC000 "too-large" (the modality keeps it), logged
    and counted like the other refusals; a film exactly at the limit is still taken."""
    source = synthetic_radiograph(seed=6, transfer_syntax=syntax)  # 96 x 80
    listener = Listener(tmp_path, limits={"max_pixels": 96 * 80})
    try:
        before = rejected_count("too-large")
        with structlog.testing.capture_logs() as events:
            results = listener.modality().send([declaring(source, 60000, 60000),
                                                declaring(source, 96, 81), source])
        print([(r.status, r.error_comment) for r in results])
        assert [r.status for r in results] == [0xC000, 0xC000, 0x0000]
        assert results[0].error_comment == "too-large: 60000 x 60000 x 1 frame(s) > max_pixels 7680"
        assert results[1].error_comment == "too-large: 96 x 81 x 1 frame(s) > max_pixels 7680"
        refused = [e for e in events if e["event"] == "instance_refused"]
        assert [e["reason"].split(":")[0] for e in refused] == ["too-large", "too-large"]
        assert rejected_count("too-large") == before + 2
        assert [job.sop_instance_uid for job in all_jobs(listener.store)] == \
            [str(source.SOPInstanceUID)]
    finally:
        listener.close()


def test_frames_count_against_max_pixels_and_the_issue_14_bomb_is_refused_unread(tmp_path):
    """Rows x Columns x Number of Frames is what the limit bounds; a deflated film declaring
    1 GB of pixels (issue 14's bomb) is refused on its header, before the rest is inflated."""
    listener = Listener(tmp_path)  # max_pixels 50 000 000
    try:
        frames = synthetic_radiograph(seed=7, rows=2000, columns=2000)
        frames.NumberOfFrames = 13  # 52 M pixels
        bomb = deflate_bomb(synthetic_radiograph(seed=8), tmp_path / "bomb.dcm",
                            inflated_bytes=1024 ** 3)
        [by_frames] = listener.modality().send([frames])
        started = time.perf_counter()
        by_pixels = listener.modality().send_file_as_is(bomb)
        seconds = time.perf_counter() - started
        print(by_frames, by_pixels, f"{seconds:.2f} s")
        assert by_frames.status == by_pixels.status == 0xC000
        assert by_frames.error_comment == \
            "too-large: 2000 x 2000 x 13 frame(s) > max_pixels 50000000"
        assert by_pixels.error_comment == \
            "too-large: 23170 x 23170 x 1 frame(s) > max_pixels 50000000"
        assert all_jobs(listener.store) == []
    finally:
        listener.close()

def test_a_dataset_past_the_limit_is_cut_off_while_it_arrives(tmp_path):
    listener = Listener(tmp_path, limits={"max_dataset_bytes": LIMIT})
    try:
        large = synthetic_radiograph(seed=3, rows=1200, columns=1000)  # 2.4 MB of pixels
        with structlog.testing.capture_logs() as events:
            [result] = listener.modality().send([large])
        assert result.status is None  # aborted: no status, not acknowledged
        [aborted] = [e for e in events if e["event"] == "association_aborted"]
        assert aborted["reason"] == "dataset-too-large"
        assert LIMIT < aborted["bytes_received"] <= LIMIT + 1024 * 1024  # one PDU past at most
        assert aborted["sop_instance_uid"] == large.SOPInstanceUID
        assert all_jobs(listener.store) == []
        assert listener.modality().send([synthetic_radiograph(seed=3)])[0].status == 0x0000
    finally:
        listener.close()


def test_a_pdu_announcing_more_than_the_limit_is_not_waited_for(tmp_path):
    """A P-DATA-TF header announcing 512 MB: the connection is closed at once, not held open
    (and its bytes gathered) until they arrive or the network timeout."""
    listener = Listener(tmp_path, limits={"max_dataset_bytes": LIMIT})
    try:
        with raw_connection(listener.port) as connection:
            connection.sendall(associate_rq(called_ae="PACS_AI"))
            assert read_pdu(connection)[0] == 0x02
            connection.sendall(struct.pack(">BBI", 0x04, 0, 512 * 1024 * 1024) + bytes(1000))
            assert closed_by_peer(connection, 2)
        assert listener.modality().echo() == 0x0000
    finally:
        listener.close()


CORRUPT_CASES = ["cut-mid-pixel-data", "half-the-pixels", "element-length-0xfffffff0",
                 "encapsulated-cut-mid-fragment", "encapsulated-no-delimiter"]


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_pixel_data_is_refused_not_acknowledged(listener, tmp_path, case):
    """Issue 14, item 3: Pixel Data cut at 50 % was answered Success and then failed, so the
    modality never sent it again; an element length of 0xFFFFFFF0 was acknowledged and
    skipped. Both are refused (0xC000 with the reason) and nothing is recorded."""
    path = corrupt_pixel_data(synthetic_radiograph(seed=4, rows=200, columns=160), tmp_path)[case]
    result = listener.modality().send_file_as_is(path)
    assert result.status == 0xC000, result
    code = result.error_comment.split(":")[0]
    expected = "no-pixel-data" if case == "element-length-0xfffffff0" else "truncated-pixel-data"
    assert code == expected, result.error_comment
    assert all_jobs(listener.store) == []
    assert list(listener.spool.images.iterdir()) == []


def test_stop_lets_a_running_association_finish(listener):
    """Graceful stop: an association in progress completes its C-STOREs before shutdown."""
    datasets = [synthetic_radiograph(seed=n) for n in range(6)]
    results = []
    sender = threading.Thread(target=lambda: results.extend(listener.modality().send(datasets)))
    sender.start()
    assert wait_until(lambda: len(all_jobs(listener.store)) >= 1, 15)
    listener.scp.stop(10)
    sender.join(timeout=30)
    acknowledged = {r.sop_instance_uid for r in results if r.acknowledged}
    recorded = {job.sop_instance_uid for job in all_jobs(listener.store)}
    assert acknowledged <= recorded  # nothing acknowledged is missing
    assert not port_open(listener.port)


# --- the whole service: `pacs-ai serve` as a subprocess ----------------------------------------

SAMPLE_DICOMS = Path(__file__).resolve().parent.parent / "sample_dicoms"
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate")


def sample_manifest() -> list[dict]:
    manifest = SAMPLE_DICOMS / "manifest.json"
    if not manifest.is_file():
        pytest.fail("sample_dicoms/manifest.json is missing; regenerate the samples")
    return json.loads(manifest.read_text())["files"]


@pytest.fixture(scope="module")
def split_model(tmp_path_factory) -> Path:
    """The tiny test model, with its threshold set between the samples' probabilities so that
    both findings occur (an untrained model's outputs sit close together)."""
    from pacs_ai.evaluate.offline_classification import classify_files
    from pacs_ai.model.model import PneumoniaModel
    from testbed.tiny_models import export_untrained_tiny_model

    folder = tmp_path_factory.mktemp("model")
    probe = PneumoniaModel.load(export_untrained_tiny_model(folder / "probe.pt"))
    probabilities = sorted(r["probability"] for r in classify_files([SAMPLE_DICOMS], probe)
                           if r["status"] == "ok")
    middle = len(probabilities) // 2
    threshold = (probabilities[middle - 1] + probabilities[middle]) / 2
    return export_untrained_tiny_model(folder / "tiny.pt", threshold=threshold)


def classify_cli(model: Path, paths: list[Path]) -> dict[str, dict]:
    """`pacs-ai classify` on the files, keyed by file name."""
    from testbed.dicom_peers import pacs_ai_cli

    result = pacs_ai_cli("classify", "--model", str(model), *map(str, paths), timeout=300)
    assert result.returncode in (0, 1), result.stderr
    return {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}


@pytest.mark.slow
def test_samples_end_to_end_modality_to_service_to_pacs(tmp_path, split_model):
    from pacs_ai.model.model import PneumoniaModel
    from pacs_ai.report.report import report_summary
    from pacs_ai.report.uids import report_uid
    from testbed.dicom_peers import RecordingPacs, ServiceProcess, pacs_ai_cli, write_service_config

    manifest = sample_manifest()
    # A modality can only send what it can read as DICOM.
    sendable = [entry for entry in manifest if entry["sop_class_uid"]]
    films = {entry["sop_instance_uid"]: entry for entry in sendable
             if entry["expected_status"] == "ok"}
    expected = classify_cli(split_model, [SAMPLE_DICOMS / e["file"] for e in sendable])
    assert {r["finding"] for r in expected.values() if r["status"] == "ok"} == {"pneumonia",
                                                                                 "normal"}
    info = PneumoniaModel.load(split_model).info

    with RecordingPacs() as pacs:
        config = write_service_config(
            tmp_path, model=split_model, destinations=[pacs.destination()],
            tables={"listener": {"sop_classes": [  # accept CT too: it must be skipped, with reason
                "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
                "DigitalXRayImageStorageForProcessing", CT_IMAGE_STORAGE]},
                "workers": {"batch_size": 4}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            modality = SimulatedModality(service.port)
            results = modality.send([SAMPLE_DICOMS / e["file"] for e in sendable])
            # the broken samples hold fewer pixel bytes than their headers declare: refused
            # (0xC000) while received, so the modality keeps them (issue 14)
            assert [r.status for r in results] == [
                0xC000 if e["expected_status"] == "error" else 0x0000 for e in sendable], results
            assert pacs.wait_for(len(films), timeout=240), service.log_path.read_text()[-3000:]
            assert wait_until(lambda: json.loads(pacs_ai_cli(
                "status", "--config", str(config), "--json").stdout)["backlog"] == 0, 60)
            status = json.loads(pacs_ai_cli("status", "--config", str(config), "--json",
                                            "--limit", "50").stdout)
            time.sleep(1.0)  # a duplicate report would arrive now
            exit_status = service.terminate()
            events = service.events()
    assert exit_status == 0

    reports = pacs.snapshot()
    summaries = [report_summary(sr) for sr in reports]
    sources = [s["source_sop_instance_uid"] for s in summaries]
    assert sorted(sources) == sorted(films)  # one report per chest film, none for the rest
    for sr, summary in zip(reports, summaries):
        entry = films[summary["source_sop_instance_uid"]]
        cli = expected[entry["file"]]
        assert cli["status"] == "ok"
        assert abs(summary["probability"] - cli["probability"]) <= 2e-6, entry["file"]
        assert summary["finding"] == cli["finding"], entry["file"]
        assert sr.SOPInstanceUID == report_uid(entry["sop_instance_uid"], info.name, info.version)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert sr.StudyInstanceUID == entry["study_instance_uid"]
        assert sr.SeriesInstanceUID != entry["series_instance_uid"]
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == entry["study_instance_uid"]
        referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == entry["sop_instance_uid"]
        assert summary["algorithm_name"] == info.name
        assert summary["algorithm_version"] == info.version

    # Every file that is not a chest film is recorded with its reason.
    recorded = {item["sop_instance_uid"]: item for item in status["skipped"] + status["failures"]}
    received = [entry for entry in sendable if entry["expected_status"] != "error"]
    for entry in received:
        if entry["expected_status"] == "ok":
            continue
        item = recorded[entry["sop_instance_uid"]]
        assert item["reason"].split(":")[0] == entry["expected_reason"], item
        assert (item["stage"] is None) == (entry["expected_status"] == "skipped")
    assert status["jobs"]["done"] == len(films)

    # One event per received instance, per classification and per delivery; UIDs, no patient data.
    names = [event["event"] for event in events]
    assert names.count("instance_received") == len(received)
    assert names.count("instance_classified") == len(films)
    assert names.count("report_delivered") == len(films)
    for event in events:
        if event["event"] == "instance_classified":
            assert {"probability", "finding", "milliseconds", "sop_instance_uid",
                    "report_uid"} <= set(event)
    log_text = (tmp_path / "serve.log").read_text()
    for entry in sendable:
        source = pydicom.dcmread(SAMPLE_DICOMS / entry["file"], stop_before_pixels=True)
        for keyword in PATIENT_KEYWORDS:
            value = str(source.get(keyword, "") or "")
            if len(value) >= 4:
                assert value not in log_text, f"{keyword} of {entry['file']} is in the log"


def test_serve_with_bad_config_prints_one_line_not_a_traceback(tmp_path):
    from testbed.dicom_peers import pacs_ai_cli

    path = tmp_path / "pacs-ai.toml"
    path.write_text("[listener]\nport = \"x\"\n")
    result = pacs_ai_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "[listener] port" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_unusable_model_with_a_message(tmp_path):
    from testbed.dicom_peers import pacs_ai_cli, write_service_config

    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"not torchscript")
    config = write_service_config(tmp_path, model=not_a_model)
    result = pacs_ai_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "not a TorchScript model file" in result.stderr and "Traceback" not in result.stderr


# --- the service in this process: file retention, metrics and health ---------------------------

def test_finished_jobs_drop_their_files_unless_kept_and_failed_ones_keep_them(tmp_path,
                                                                              tiny_model):
    from pacs_ai.config import load_config
    from pacs_ai.service import Service
    from testbed.dicom_peers import write_service_config

    config = load_config(write_service_config(
        tmp_path, model=tiny_model,
        tables={"storage": {"keep_source_images": False, "keep_reports": False},
                "metrics": {"enabled": True, "port": 0}}))
    service = Service(config).start()
    try:
        film = synthetic_radiograph(seed=1)
        lateral = synthetic_radiograph(seed=2, view_position="LL")
        broken = undecodable(synthetic_radiograph(seed=3))  # well formed, so acknowledged
        results = SimulatedModality(service.port).send([film, lateral, broken])
        assert [r.status for r in results] == [0, 0, 0]
        store = service.store
        assert wait_until(lambda: store.backlog() == 0, 60)
        states = {job.sop_instance_uid: job for job in all_jobs(store)}
        assert states[film.SOPInstanceUID].state == "done"
        assert states[lateral.SOPInstanceUID].state == "skipped"
        failed = states[broken.SOPInstanceUID]
        assert failed.state == "failed" and failed.stage == "classify" and failed.reason
        remaining = {p.name for p in service.spool.images.iterdir()}
        assert remaining == {Path(failed.image_file).name}  # kept for `pacs-ai retry`
        assert list(service.spool.outbox.iterdir()) == []  # no destination: nothing to keep

        import urllib.request
        base = f"http://127.0.0.1:{service.http_server.port}"
        health = json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=10).read())
        assert health["ok"] and health["listening"] and health["workers_alive"] == 1
        service.refresh_gauges()
        scrape = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        assert "pacs_ai_received_total" in scrape and "pacs_ai_backlog_jobs 0.0" in scrape
        assert 'pacs_ai_skipped_total{reason="not-frontal"}' in scrape
    finally:
        service.stop()
    assert not service.scp.running


def test_failed_and_skipped_files_are_purged_after_keep_failed_days(tmp_path, tiny_model):
    """Issue 14: failed and skipped source files were kept for ever (a 400 MB hostile file
    stayed in the spool). After [storage] keep_failed_days they go, logged; the rows stay."""
    import sqlite3

    from pacs_ai.config import load_config
    from pacs_ai.service import Service
    from testbed.dicom_peers import write_service_config

    config = load_config(write_service_config(
        tmp_path, model=tiny_model,
        tables={"storage": {"keep_source_images": True, "keep_failed_days": 2},
                "workers": {"processes": 0}}))
    service = Service(config).start()
    try:
        lateral = synthetic_radiograph(seed=2, view_position="LL")
        broken = undecodable(synthetic_radiograph(seed=3))
        old_lateral, old_broken = (synthetic_radiograph(seed=4, view_position="LL"),
                                   undecodable(synthetic_radiograph(seed=5)))
        results = SimulatedModality(service.port).send([lateral, broken, old_lateral,
                                                        old_broken])
        assert [r.status for r in results] == [0, 0, 0, 0]
        store = service.store
        assert wait_until(lambda: store.backlog() == 0, 60)
        files = {job.sop_instance_uid: service.spool.resolve(job.image_file)
                 for job in all_jobs(store)}
        assert all(path.exists() for path in files.values())
        # two of them settled three days ago
        with sqlite3.connect(service.spool.db_path) as db:
            db.executemany("UPDATE jobs SET updated_at = updated_at - 3 * 86400 "
                           "WHERE sop_instance_uid = ?",
                           [(old_lateral.SOPInstanceUID,), (old_broken.SOPInstanceUID,)])
        with structlog.testing.capture_logs() as events:
            assert service.files.purge_expired() == 2
        [purged] = [e for e in events if e["event"] == "failed_files_purged"]
        assert purged["failed"] == 1 and purged["skipped"] == 1 and purged["bytes"] > 0
        assert purged["keep_failed_days"] == 2
        assert not files[old_lateral.SOPInstanceUID].exists()
        assert not files[old_broken.SOPInstanceUID].exists()
        assert files[lateral.SOPInstanceUID].exists() and files[broken.SOPInstanceUID].exists()
        jobs = {job.sop_instance_uid: job for job in all_jobs(store)}
        assert jobs[old_broken.SOPInstanceUID].state == "failed"  # the record stays
        assert jobs[old_broken.SOPInstanceUID].reason
        assert service.files.purge_expired() == 0  # once only
        # `pacs-ai retry` leaves the purged one alone (its image is gone) ...
        assert store.requeue_failed() == (1, 0)
        # ... and a re-send of its image runs it again
        assert SimulatedModality(service.port).send([old_broken])[0].status == 0
        assert store.find(old_broken.SOPInstanceUID).state in ("pending", "classifying",
                                                               "failed")
        assert store.find(old_broken.SOPInstanceUID).image_file != ""
    finally:
        service.stop()


def test_start_up_warns_when_reports_go_nowhere(tmp_path, tiny_model):
    """Issue 14: a config without [[destinations]] started quietly, and every report was made
    and dropped."""
    from pacs_ai.config import load_config
    from pacs_ai.service import Service
    from testbed.dicom_peers import write_service_config

    def start_up_events(folder: Path, destinations) -> list[dict]:
        folder.mkdir()
        config = load_config(write_service_config(folder, model=tiny_model,
                                                  destinations=destinations,
                                                  tables={"workers": {"processes": 0}}))
        with structlog.testing.capture_logs() as events:
            service = Service(config).start()
            service.stop()
        return events

    events = start_up_events(tmp_path / "none", [])
    [warning] = [e for e in events if e["event"] == "no_destination"]
    assert warning["log_level"] == "warning" and "sent nowhere" in warning["detail"]
    closed = {"ae_title": "PACS", "host": LOCALHOST, "port": free_port()}
    assert not [e for e in start_up_events(tmp_path / "one", [closed])
                if e["event"] == "no_destination"]


def test_a_resent_image_retries_its_failed_job_and_gets_reported(tmp_path, tiny_model):
    """A film whose pixels cannot be decoded (not something the listener can check before it
    acknowledges) fails; the modality sends it again, intact, and this time it is classified
    and reported (the acknowledgement alone would lose the finding)."""
    from pacs_ai.config import load_config
    from pacs_ai.service import Service
    from testbed.dicom_peers import write_service_config

    with RecordingPacs() as pacs:
        config = load_config(write_service_config(tmp_path, model=tiny_model,
                                                  destinations=[pacs.destination()]))
        service = Service(config).start()
        try:
            whole = synthetic_radiograph(seed=7)
            broken = undecodable(whole)
            modality = SimulatedModality(service.port)
            assert [r.status for r in modality.send([broken])] == [0x0000]
            store = service.store
            uid = str(whole.SOPInstanceUID)
            assert wait_until(lambda: store.find(uid).state == "failed", 60)
            assert store.find(uid).reason.startswith("decode-failed")

            assert [r.status for r in modality.send([whole])] == [0x0000]
            assert wait_until(lambda: store.find(uid).state == "done", 60), store.find(uid)
            assert pacs.wait_for(1)
            [report] = pacs.snapshot()
            evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
            assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
                .ReferencedSOPInstanceUID == uid
            assert store.job_counts()["done"] == 1
        finally:
            service.stop()
