"""How a report file goes over the wire: as stored when the PACS accepted its transfer syntax,
converted when it did not (real pynetdicom associations; the service paths are in
test_delivery and test_real_peers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_ai.config import Destination
from pacs_ai.deliver.cstore_transport import CStoreTransport, report_to_send
from pacs_ai.deliver.sender import DestinationSender
from pacs_ai.model.model import ModelInfo
from pacs_ai.report.report import build_report
from testbed.dicom_peers import RecordingPacs, synthetic_radiograph

MODEL = ModelInfo(name="pacs-ai-pneumonia", version="9.9.9", threshold=0.5,
                  output_kind="probability", metadata={})


@pytest.fixture
def report_file(tmp_path) -> tuple[Path, Dataset]:
    report = build_report(synthetic_radiograph(seed=3), 0.81, MODEL)
    path = tmp_path / "report.dcm"
    report.save_as(path, enforce_file_format=True)
    return path, report


def associate(pacs: RecordingPacs):
    transport = CStoreTransport(Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1",
                                            port=pacs.port))
    association = transport._ae().associate("127.0.0.1", pacs.port, ae_title=pacs.ae_title)
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


# --- why a TLS connection to the PACS failed, against DCMTK's storescp +tls -------------------

@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory):
    """storescp over TLS (demanding a client certificate from our CA), and a plain one."""
    import subprocess

    from testbed.dicom_peers import free_port
    from testbed.environment import require_tool
    from testbed.real_peers import stop_process, wait_for_port
    from tests.tls_material import make_tls_material

    tool = require_tool("storescp")
    folder = tmp_path_factory.mktemp("tls-pacs")
    material = make_tls_material(folder)
    stranger = make_tls_material(folder, prefix="stranger-")
    tls_port, plain_port = free_port(), free_port()
    servers = [subprocess.Popen([tool, "+tls", str(material.server_key), str(material.server_cert),
                                 "-pem", "+cf", str(material.ca_cert), "-rc", "-od", str(folder),
                                 str(tls_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen([tool, "-od", str(folder), str(plain_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for server, port in zip(servers, (tls_port, plain_port)):
            wait_for_port(port, process=server, what="storescp")
        yield material, stranger, tls_port, plain_port
    finally:
        for server in servers:
            stop_process(server)


def failed_attempt(host: str, port: int, tls) -> str:
    """The error a sender records for one attempt to deliver to host:port."""
    from pacs_ai.config import TLSFiles

    sender = DestinationSender(
        Destination(name="pacs", ae_title="STORESCP", host=host, port=port, timeout_seconds=10,
                    tls=TLSFiles(**tls)), None, None, None, None, None, None)
    errors = []
    sender._attempts_failed = lambda due, error: errors.append(error)
    sender.send([object()])
    [error] = errors
    return error


@pytest.mark.real_peer
def test_tls_failures_towards_the_pacs_say_why(tls_pacs):
    """Issue 14: every TLS failure was logged as connection-failed, which sends the admin to
    the firewall; the reason is now the certificate, the host name or the protocol."""
    material, stranger, tls_port, plain_port = tls_pacs
    ours = {"ca_file": material.ca_cert, "cert_file": material.client_cert,
            "key_file": material.client_key}
    where = f"(STORESCP@127.0.0.1:{tls_port})"

    untrusted = failed_attempt("127.0.0.1", tls_port, {**ours, "ca_file": stranger.ca_cert})
    assert untrusted.startswith("tls-certificate: ") and untrusted.endswith(where), untrusted
    assert "self-signed certificate in certificate chain" in untrusted

    # the PACS's certificate names localhost and 127.0.0.1, not 127.0.0.2 (same machine)
    other_name = failed_attempt("127.0.0.2", tls_port, ours)
    assert other_name.startswith("tls-hostname: ") and "127.0.0.2" in other_name, other_name

    refused = failed_attempt("127.0.0.1", tls_port, {"ca_file": material.ca_cert})  # no cert
    assert refused.startswith("tls-client-certificate-refused: "), refused

    not_tls = failed_attempt("127.0.0.1", plain_port, ours)
    assert not_tls.startswith("tls-protocol: ") and "TLS handshake" in not_tls, not_tls

    from testbed.dicom_peers import free_port

    closed = failed_attempt("127.0.0.1", free_port(), ours)  # nothing listening
    assert closed.startswith("connection-failed: "), closed


@pytest.mark.real_peer
def test_a_sound_tls_connection_to_the_pacs_still_works(tls_pacs):
    from pacs_ai.config import TLSFiles

    material, _, tls_port, _ = tls_pacs
    transport = CStoreTransport(
        Destination(name="pacs", ae_title="STORESCP", host="127.0.0.1", port=tls_port,
                    tls=TLSFiles(ca_file=material.ca_cert, cert_file=material.client_cert,
                                 key_file=material.client_key)))
    connection = transport.connect()
    assert connection.is_open()
    connection.close()
    assert transport._ssl_context.tls_failure is None
