"""DICOMweb destinations (kind = "dicomweb"): reports go to Orthanc's DICOMweb plugin by STOW-RS.

`pacs-ai serve` runs as a subprocess; Orthanc runs with the Debian orthanc-dicomweb plugin. A
small HTTP proxy between them (ScriptedProxy) answers some requests itself (503, 400) or
forwards them and then answers 503 as if the answer was lost, to show retries, a re-send
keeping one instance, and a 4xx failing with the server's message.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from testbed.dicom_peers import (LOCALHOST, ServiceProcess, SimulatedModality, pacs_ai_cli,
                                 synthetic_radiograph, wait_until, write_service_config)
from testbed.real_peers import Orthanc

pytestmark = pytest.mark.real_peer


class ScriptedProxy:
    """An HTTP proxy to `target` that handles request N by the N-th action of `script` (then
    "forward"): "forward"; "503" (answered here, not forwarded); "forward-then-503" (forwarded,
    the server's answer replaced by a 503: the server stored it, the client does not know);
    "400" (answered here with a JSON message, like a server refusing the dataset)."""

    def __init__(self, target: str, script: list[str], *, tls: Any = None):
        self.target = urlsplit(target)
        self.script = list(script)
        self.seen: list[str] = []  # the action taken for each request
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0)) \
                    if "chunked" not in self.headers.get("Transfer-Encoding", "") \
                    else self._read_chunked()
                with proxy._lock:
                    action = proxy.script.pop(0) if proxy.script else "forward"
                    proxy.seen.append(action)
                    proxy.authorizations.append(self.headers.get("Authorization"))
                if action == "503":
                    return self._answer(503, b"busy, try later", "text/plain")
                if action == "400":
                    return self._answer(400, json.dumps(
                        {"HttpError": "Bad Request", "Message": "Dataset refused by policy: "
                         "no SR accepted from this sender"}).encode(), "application/json")
                status, headers, answer = proxy.forward("POST", self.path, dict(self.headers), body)
                if action == "forward-then-503":
                    return self._answer(503, b"gateway lost the answer", "text/plain")
                self._answer(status, answer, headers.get("Content-Type", "text/plain"))

            def _read_chunked(self) -> bytes:
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.scheme = "http"
        if tls is not None:  # HTTPS with the test CA's server certificate (tls_material)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def forward(self, method: str, path: str, headers: dict, body: bytes):
        connection = http.client.HTTPConnection(self.target.hostname, self.target.port,
                                                timeout=30)
        headers = {k: v for k, v in headers.items()
                   if k.lower() not in ("host", "transfer-encoding", "content-length",
                                        "accept-encoding")}  # answers go back uncompressed
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOCALHOST}:{self.server.server_address[1]}{self.target.path}"

    def __enter__(self) -> "ScriptedProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("orthanc-web"), dicomweb=True,
                 users={"pacs-ai": "s3cret-stow"}) as pacs:
        yield pacs


def password_file(folder: Path, password: str = "s3cret-stow") -> Path:
    path = folder / "stow-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def web_destination(url: str, folder: Path, **extra) -> dict:
    return {"name": "web", "kind": "dicomweb", "url": url, "auth": "basic",
            "username": "pacs-ai", "password_file": str(password_file(folder)),
            "timeout_seconds": 10, **extra}


def send_film(port: int, seed: int):
    film = synthetic_radiograph(seed=seed)
    [result] = SimulatedModality(port).send([film])
    assert result.acknowledged, result
    return film


def reports_in_study(orthanc: Orthanc, film) -> list[str]:
    return orthanc.study_sop_instance_uids(str(film.StudyInstanceUID), modality="SR")


def status(config: Path) -> dict:
    result = pacs_ai_cli("status", "--config", str(config), "--json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def delivered_events(service: ServiceProcess) -> list[dict]:
    return [e for e in service.events() if e["event"] == "report_delivered"]


def test_a_report_arrives_by_stow_rs_with_basic_auth(tmp_path, orthanc, tiny_model):
    config = write_service_config(tmp_path, model=tiny_model,
                                  destinations=[web_destination(orthanc.dicomweb_url, tmp_path)])
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        film = send_film(service.port, seed=11)
        assert wait_until(lambda: len(reports_in_study(orthanc, film)) == 1, 60), \
            service.log_path.read_text()[-3000:]
        assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 30)
        [event] = delivered_events(service)
        assert event["destination"] == "web" and event["status"] == "HTTP 200"
    # the stored SR is the report of this film, byte-identical in its content
    orthanc_id = orthanc.find_instance(reports_in_study(orthanc, film)[0])
    tags = orthanc.instance_tags(orthanc_id)
    assert tags["Modality"] == "SR" and tags["StudyInstanceUID"] == str(film.StudyInstanceUID)


def test_a_5xx_is_retried_and_a_re_send_keeps_one_instance(tmp_path, orthanc, tiny_model):
    """First answer 503 without storing; then forward, but lose the answer (Orthanc stored
    it, pacs-ai saw 503); then forward: the same report is stored twice, Orthanc keeps one."""
    with ScriptedProxy(orthanc.dicomweb_url, ["503", "forward-then-503"]) as proxy:
        config = write_service_config(tmp_path, model=tiny_model,
                                      destinations=[web_destination(proxy.url, tmp_path)])
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            film = send_film(service.port, seed=12)
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            retries = [e for e in service.events() if e["event"] == "delivery_retry_scheduled"]
            assert [e["attempts"] for e in retries] == [1, 2]
            assert all(e["error"].startswith("http-503: ") for e in retries), retries
            assert "busy, try later" in retries[0]["error"]
            [event] = delivered_events(service)
            assert event["attempts"] == 3
        assert proxy.seen == ["503", "forward-then-503", "forward"]
    assert len(reports_in_study(orthanc, film)) == 1  # stored twice, kept once


def test_a_4xx_fails_at_once_with_the_servers_message(tmp_path, orthanc, tiny_model):
    with ScriptedProxy(orthanc.dicomweb_url, ["400"]) as proxy:
        config = write_service_config(tmp_path, model=tiny_model,
                                      destinations=[web_destination(proxy.url, tmp_path)])
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            film = send_film(service.port, seed=13)
            assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            [failed] = [e for e in service.events() if e["event"] == "delivery_failed"]
            assert failed["attempts"] == 1  # not retried: the same bytes would be refused again
            assert failed["error"].startswith("http-400: Dataset refused by policy"), failed
            report = status(config)
            [failure] = report["failures"]
            assert failure["stage"] == "deliver" and "http-400: Dataset refused" in \
                failure["reason"]
            assert proxy.seen == ["400"]
            # `pacs-ai retry` after the fix: the proxy now forwards, the report arrives
            assert pacs_ai_cli("retry", "--config", str(config)).returncode == 0
            assert wait_until(lambda: len(reports_in_study(orthanc, film)) == 1, 60)


def test_a_wrong_password_is_retried_with_the_servers_answer(tmp_path, orthanc, tiny_model):
    destination = web_destination(orthanc.dicomweb_url, tmp_path)
    (tmp_path / "wrong").mkdir()
    destination["password_file"] = str(password_file(tmp_path / "wrong", "wrong"))
    config = write_service_config(tmp_path, model=tiny_model, destinations=[destination],
                                  tables={"retry": {"max_attempts": 3}})
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        film = send_film(service.port, seed=14)
        assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 60)
        errors = [e["error"] for e in service.events()
                  if e["event"] in ("delivery_retry_scheduled", "delivery_failed")]
        assert len(errors) == 3 and all(e.startswith("http-401: ") for e in errors), errors
    assert reports_in_study(orthanc, film) == []


def test_https_with_the_archive_s_ca_and_a_bearer_token(tmp_path, tiny_model):
    """An HTTPS DICOMweb server (the proxy, certificate from a test CA) in front of an Orthanc
    without authentication: ca_file verifies it and the token goes as a Bearer header; a
    destination trusting another CA fails with tls-certificate."""
    from tests.tls_material import make_tls_material

    material = make_tls_material(tmp_path / "tls")
    stranger = make_tls_material(tmp_path / "tls", prefix="stranger-")
    (tmp_path / "token").write_text("opaque-bearer-token\n")
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc, \
            ScriptedProxy(orthanc.dicomweb_url, [], tls=material) as proxy:
        assert proxy.url.startswith("https://127.0.0.1:")
        bearer = {"kind": "dicomweb", "url": proxy.url, "auth": "bearer",
                  "token_file": str(tmp_path / "token"), "timeout_seconds": 10}
        config = write_service_config(
            tmp_path, model=tiny_model,
            destinations=[{**bearer, "name": "web", "ca_file": str(material.ca_cert)},
                          {**bearer, "name": "untrusted", "ca_file": str(stranger.ca_cert)}],
            tables={"retry": {"max_attempts": 2}})
        # ca_file must win over a CA bundle in the environment (requests would take that)
        with ServiceProcess(config, tmp_path / "serve.log",
                            env={"REQUESTS_CA_BUNDLE": str(stranger.ca_cert)}) as service:
            film = send_film(service.port, seed=15)
            assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            [delivered] = delivered_events(service)
            assert delivered["destination"] == "web"
            [failed] = [e for e in service.events() if e["event"] == "delivery_failed"]
            assert failed["destination"] == "untrusted"
            assert failed["error"].startswith("tls-certificate: "), failed
            assert failed["error"].endswith(f"({proxy.url})"), failed
        assert proxy.authorizations == ["Bearer opaque-bearer-token"]  # the untrusted: none
        assert len(reports_in_study(orthanc, film)) == 1
