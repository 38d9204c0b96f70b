"""The service's small HTTP server: `/metrics` (Prometheus text format; an optional callback
refreshes the gauges first), `/healthz` (liveness) and `/readyz` (readiness), each JSON from a
callback (pacs_ai.ops.health): 200 when its "ok" is true, else 503; and with a queue page
(pacs_ai.ops.web) `/queue`, `/api/queue` and the retry POST. One thread per request; a failing
callback answers 503 or 500 and never takes the server down.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pacs_ai.errors import UserError
from pacs_ai.ops.metrics import REGISTRY

log = structlog.get_logger()

HealthCallback = Callable[[], dict[str, Any]]
# The largest request body taken: the queue page's retry form is a few dozen bytes.
MAX_REQUEST_BODY_BYTES = 4096


class HttpServer:
    """A running HTTP server in a daemon thread."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host: str = httpd.server_address[0]
        self.port: int = httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shutdown(self) -> None:
        """Stop serving and close the socket; safe to call more than once."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


def _handler_class(health: HealthCallback, ready: HealthCallback,
                   refresh: Callable[[], None] | None,
                   web: Any = None) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        server_version = "pacs-ai-metrics"

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                if refresh is not None:
                    try:
                        refresh()
                    except Exception as error:  # stale gauges beat no metrics at all
                        log.warning("metrics_refresh_failed", error=str(error))
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif path in ("/healthz", "/readyz"):
                status, body = _health_response(health if path == "/healthz" else ready)
                self._send(status, "application/json", body)
            elif not self._web(lambda: web.get(path, self.headers.get("Accept"))):
                self._send(404, "text/plain; charset=utf-8",
                           b"not found: try /metrics, /healthz, /readyz or /queue\n")

        def do_POST(self) -> None:  # noqa: N802
            """The queue page's retry (pacs_ai.ops.web); nothing else takes a POST."""
            path = self.path.split("?", 1)[0]
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_REQUEST_BODY_BYTES:
                self._send(413, "text/plain; charset=utf-8", b"request body too large\n")
                return
            body = self.rfile.read(length) if length > 0 else b""
            if not self._web(lambda: web.post(path, body, self.headers.get("Authorization"),
                                              self.client_address[0])):
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _web(self, answer_of: Callable[[], Any]) -> bool:
            """Answer from the queue page; False when it has no answer for this path."""
            if web is None:
                return False
            try:
                answer = answer_of()
            except Exception as error:  # the queue unreadable: say so, keep serving
                log.exception("web_page_failed", error=str(error))
                self._send(500, "text/plain; charset=utf-8", b"internal error, see the log\n")
                return True
            if answer is None:
                return False
            self._send(answer.status, answer.content_type, answer.body, answer.headers)
            return True

        def _send(self, status: int, content_type: str, body: bytes,
                  headers: tuple[tuple[str, str], ...] = ()) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            # Scrapes every few seconds would flood the journal; keep them at debug level.
            log.debug("metrics_http_request", client=self.client_address[0], request=format % args)

    return RequestHandler


def _health_response(health: HealthCallback) -> tuple[int, bytes]:
    """Never lets a failing health callback take the server down: it reports unhealthy instead."""
    try:
        report = dict(health())
    except Exception as error:  # the check itself failing is a health finding, not a crash
        log.warning("health_check_failed", error=str(error))
        report = {"ok": False, "error": f"health check failed: {error}"}
    status = 200 if report.get("ok") else 503
    return status, (json.dumps(report, default=str, sort_keys=True) + "\n").encode()


def start_http_server(host: str, port: int, health: HealthCallback,
                      ready: HealthCallback | None = None,
                      refresh: Callable[[], None] | None = None,
                      web: Any = None) -> HttpServer:
    """Serve /metrics, /healthz (`health`) and /readyz (`ready`, default `health`) on host:port
    (port 0: a free port) in a daemon thread; `refresh` runs before each /metrics answer. `web`
    (a pacs_ai.ops.web.QueuePage) adds the queue page and its JSON."""
    try:
        httpd = ThreadingHTTPServer((host, port),
                                    _handler_class(health, ready or health, refresh, web))
    except OSError as error:
        raise UserError(
            f"cannot serve metrics on {host}:{port}: {error.strerror or error}; "
            "choose another [metrics] port or host in the config, or set [metrics] enabled = false"
        ) from error
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics-{port}", daemon=True)
    thread.start()
    server = HttpServer(httpd, thread)
    log.info("metrics_serving", url=server.url)
    return server
