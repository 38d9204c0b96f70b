"""How a report file goes over the wire: as stored when the PACS accepted its transfer syntax,
converted when it did not (real pynetdicom associations; the service paths are in
test_delivery and test_real_peers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_ai.config import Destination
from pacs_ai.model import ModelInfo
from pacs_ai.report import build_report
from pacs_ai.sender import DestinationSender, report_to_send
from tests.dicom_peers import RecordingPacs, synthetic_radiograph

MODEL = ModelInfo(name="pacs-ai-pneumonia", version="9.9.9", threshold=0.5,
                  output_kind="probability", metadata={})


@pytest.fixture
def report_file(tmp_path) -> tuple[Path, Dataset]:
    report = build_report(synthetic_radiograph(seed=3), 0.81, MODEL)
    path = tmp_path / "report.dcm"
    report.save_as(path, enforce_file_format=True)
    return path, report


def associate(pacs: RecordingPacs):
    sender = DestinationSender(Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1",
                                           port=pacs.port), None, None, None, None, None, None)
    association = sender._ae().associate("127.0.0.1", pacs.port, ae_title=pacs.ae_title)
    assert association.is_established
    return association


@pytest.mark.parametrize("accepted,sent_as_stored", [
    ([ExplicitVRLittleEndian, ImplicitVRLittleEndian], True),
    ([ImplicitVRLittleEndian], False),  # an old PACS: the report must be converted
])
def test_the_pacs_receives_the_report_whatever_syntax_it_accepted(report_file, accepted,
                                                                   sent_as_stored):
    path, report = report_file
    with RecordingPacs(transfer_syntaxes=accepted) as pacs:
        association = associate(pacs)
        try:
            to_send = report_to_send(association, path)
            assert isinstance(to_send, Path) is sent_as_stored
            answer = association.send_c_store(to_send)
        finally:
            association.release()
        assert answer.Status == 0x0000
        assert pacs.wait_for(1, timeout=10)
    received = pacs.snapshot()[0]
    assert received.file_meta.TransferSyntaxUID == accepted[0]
    for keyword in ("SOPInstanceUID", "PatientName", "StudyInstanceUID", "ContentSequence"):
        assert received[keyword].value == report[keyword].value, keyword


def test_a_file_without_file_meta_is_unreadable(tmp_path, report_file):
    path, _ = report_file
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    with RecordingPacs() as pacs:
        association = associate(pacs)
        try:
            with pytest.raises(Exception):
                report_to_send(association, broken)
        finally:
            association.release()
