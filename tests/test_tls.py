"""DICOM over TLS end to end: DCMTK's storescu/echoscu (+tls) into pacs-ai, pacs-ai's reports out
to Orthanc over TLS, certificates made here with the `cryptography` package (one CA signs the
listener's, Orthanc's and the clients' certificates; a second CA plays a stranger).

Mutual TLS both ways: the listener requires a client certificate signed by its CA, Orthanc
requires pacs-ai's client certificate.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time

import pydicom
import pytest

from testbed.dicom_peers import ServiceProcess, SimulatedModality, wait_until, write_service_config
from testbed.environment import REPO_ROOT, SAMPLE_DICOMS, require_tool
from testbed.real_peers import (Modality, Orthanc, OrthancTLS, echoscu, orthanc_destination,
                                propose_as_stored, renamed_copy, storescu, thread_count)
from tests.test_real_peers import check_stored_report, stored_reports_for
from tests.tls_material import make_tls_material

pytestmark = pytest.mark.real_peer

SAMPLE = SAMPLE_DICOMS / "cr_pneumonia_pa_12bit_jpeg_extended.dcm"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    return make_tls_material(folder), make_tls_material(folder, prefix="stranger-")


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory, pki):
    require_tool("Orthanc")
    material, _ = pki
    with Orthanc(tmp_path_factory.mktemp("orthanc-tls"),
                 modalities=[Modality("PACS_AI", 104, tls=True)],
                 tls=OrthancTLS(cert_file=material.server_cert, key_file=material.server_key,
                                trusted_file=material.ca_cert)) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory, pki, tls_orthanc, tiny_model):
    material, _ = pki
    folder = tmp_path_factory.mktemp("tls-service")
    destination = orthanc_destination(tls_orthanc, tls={
        "ca_file": str(material.ca_cert), "cert_file": str(material.client_cert),
        "key_file": str(material.client_key)})
    config = write_service_config(
        folder, model=tiny_model, destinations=[destination],
        tables={"tls": {"cert_file": str(material.server_cert),
                        "key_file": str(material.server_key),
                        "ca_file": str(material.ca_cert), "require_client_cert": True},
                "limits": {"acse_timeout_seconds": 3}})
    with TLSServiceProcess(config, folder / "serve.log",
                           ssl_context=client_context(material)) as running:
        yield running
        assert running.process.poll() is None, "the service exited during the tests"


def client_context(material) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(material.ca_cert))
    context.check_hostname = False  # SimulatedModality gives no server name; the chain is checked
    context.load_cert_chain(str(material.client_cert), str(material.client_key))
    return context


class TLSServiceProcess(ServiceProcess):
    """ServiceProcess whose readiness check (a C-ECHO) speaks TLS, as the listener demands."""

    def __init__(self, *args, ssl_context: ssl.SSLContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.ssl_context = ssl_context

    def start(self) -> "TLSServiceProcess":
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_ai", "serve", "--config", str(self.config_path)],
                cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
        modality = SimulatedModality(self.port, timeout=5, ssl_context=self.ssl_context)
        if not wait_until(lambda: self.process.poll() is not None or modality.echo() == 0,
                          self.ready_timeout, interval=0.2) or self.process.poll() is not None:
            self.kill()
            raise RuntimeError(f"TLS pacs-ai serve not ready:\n{self.log_path.read_text()[-4000:]}")
        return self


def tls_options(key, cert, ca) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def test_storescu_over_tls_is_accepted_and_the_report_goes_out_over_tls(
        tls_service, tls_orthanc, pki, tmp_path):
    material, _ = pki
    copy = renamed_copy(SAMPLE, tmp_path / "image.dcm")
    options = tls_options(material.client_key, material.client_cert, material.ca_cert)
    echoed = echoscu(tls_service.port, called_ae="PACS_AI", extra=options)
    print(echoed.stdout + echoed.stderr)
    assert echoed.returncode == 0 and "Received Echo Response (Success)" in (
        echoed.stdout + echoed.stderr)
    run = storescu(tls_service.port, [copy], called_ae="PACS_AI", calling_ae="XRAY_TLS",
                   extra=options + propose_as_stored([copy], tmp_path / "as-stored.cfg"))
    print(run.output)
    assert run.acknowledged == [str(copy)], run.output
    source = pydicom.dcmread(copy, stop_before_pixels=True)
    uid, study = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
    assert wait_until(lambda: stored_reports_for(tls_orthanc, study, uid), 60), (
        "no report reached the TLS PACS:\n" + tls_service.log_path.read_text()[-3000:])
    (report,) = stored_reports_for(tls_orthanc, study, uid)
    check_stored_report(tls_orthanc, report, tmp_path)
    def delivered() -> list[dict]:  # logged once the PACS's answer is recorded, just after
        return [e for e in tls_service.events() if e.get("event") == "report_delivered"
                and e.get("sop_instance_uid") == uid]

    assert wait_until(delivered, 10), tls_service.log_path.read_text()[-3000:]
    assert delivered()[0]["status"] == "0x0000"


def test_plain_and_wrongly_certified_connections_are_refused(tls_service, pki, tmp_path):
    material, stranger = pki
    copy = renamed_copy(SAMPLE, tmp_path / "image.dcm")
    threads_before = thread_count(tls_service.process.pid)

    plain = storescu(tls_service.port, [copy], called_ae="PACS_AI", timeout_s=60)
    print(plain.output)
    assert plain.acknowledged == [] and plain.returncode != 0, plain.output
    assert "Association Accepted" not in plain.output

    # A client certificate from another CA: the handshake fails (require_client_cert).
    foreign = storescu(tls_service.port, [copy], called_ae="PACS_AI", timeout_s=60,
                       extra=tls_options(stranger.client_key, stranger.client_cert,
                                         material.ca_cert))
    print(foreign.output)
    assert foreign.acknowledged == [] and "Association Accepted" not in foreign.output

    # No client certificate at all (anonymous TLS, server still verified).
    anonymous = storescu(tls_service.port, [copy], called_ae="PACS_AI", timeout_s=60,
                         extra=["+tla", "+cf", str(material.ca_cert)])
    print(anonymous.output)
    assert anonymous.acknowledged == [] and "Association Accepted" not in anonymous.output

    # The listener does not trust a server certificate we would not trust either: storescu
    # verifying the listener against the stranger CA refuses to go on.
    unverified = storescu(tls_service.port, [copy], called_ae="PACS_AI", timeout_s=60,
                          extra=tls_options(material.client_key, material.client_cert,
                                            stranger.ca_cert))
    assert unverified.acknowledged == []

    assert tls_service.process.poll() is None
    good = echoscu(tls_service.port, called_ae="PACS_AI",
                   extra=tls_options(material.client_key, material.client_cert,
                                     material.ca_cert))
    assert good.returncode == 0, good.stdout + good.stderr
    # Each refused handshake is recorded (4 above; the last one fails on storescu's side).
    refused = [e for e in tls_service.events() if e.get("event") == "connection_refused"
               and e.get("reason") == "tls-handshake-failed"]
    assert len(refused) >= 3, refused
    # Refused handshakes leave no thread behind (bounded wait: the ACSE timeout is 3 s).
    assert wait_until(lambda: thread_count(tls_service.process.pid) <= threads_before, 20), (
        f"threads {threads_before} -> {thread_count(tls_service.process.pid)}")


def test_a_peer_that_never_starts_its_handshake_holds_up_nobody(tls_service, pki):
    """A TCP connection that never sends its TLS ClientHello (a port scanner, a stuck client)
    must not stop the listener from accepting others until the network timeout (60 s here)."""
    material, _ = pki
    with socket.create_connection(("127.0.0.1", tls_service.port), timeout=5):
        time.sleep(0.5)  # accepted by now
        good = echoscu(tls_service.port, called_ae="PACS_AI", timeout_s=30,
                       extra=tls_options(material.client_key, material.client_cert,
                                         material.ca_cert))
        assert good.returncode == 0, good.stdout + good.stderr


def test_silent_tls_peers_are_capped_like_any_open_connection(tmp_path, pki, tiny_model):
    """Peers stuck before their handshake each hold a thread until the association request
    timeout, so they count against the open-connection caps (2 x max_associations in all,
    max_associations per address) like any other."""
    material, _ = pki
    config = write_service_config(
        tmp_path, model=tiny_model,
        tables={"tls": {"cert_file": str(material.server_cert),
                        "key_file": str(material.server_key),
                        "ca_file": str(material.ca_cert), "require_client_cert": True},
                "limits": {"max_associations": 2, "network_timeout_seconds": 30,
                           "acse_timeout_seconds": 2}})
    with TLSServiceProcess(config, tmp_path / "serve.log",
                           ssl_context=client_context(material)) as service:
        threads_before = thread_count(service.process.pid)
        silent = [socket.create_connection(("127.0.0.1", service.port), timeout=5)
                  for _ in range(6)]
        try:
            assert wait_until(lambda: sum(
                e.get("reason", "").startswith("connection-limit") for e in service.events()
                if e.get("event") == "connection_refused") >= 2, 10), \
                service.log_path.read_text()[-3000:]
            assert thread_count(service.process.pid) <= threads_before + 4
        finally:
            for peer in silent:
                peer.close()
        # once they are gone (each admitted one ends as a failed handshake, and its association
        # at once), no thread is left behind and a client gets in
        assert wait_until(lambda: thread_count(service.process.pid) <= threads_before, 15)
        good = echoscu(service.port, called_ae="PACS_AI", timeout_s=30,
                       extra=tls_options(material.client_key, material.client_cert,
                                         material.ca_cert))
        assert good.returncode == 0, good.stdout + good.stderr
    assert not any(e.get("event") == "associations_aborted_at_shutdown"
                   for e in service.events())
