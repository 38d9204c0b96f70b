"""The metrics module over real HTTP: /metrics in Prometheus text format, /healthz as JSON."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pacs_ai.errors import UserError
from pacs_ai.ops import http_server, metrics


def http_get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def scrape(server: http_server.HttpServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and labels -> value, parsed with prometheus-client's own text parser."""
    status, content_type, body = http_get(server.url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def healthy_server():
    server = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True, "backlog": 0})
    yield server
    server.shutdown()


def test_metric_names_are_the_documented_ones(healthy_server):
    samples = scrape(healthy_server)
    names = {name for name, _labels in samples}
    for expected in ("pacs_ai_received_total", "pacs_ai_classify_seconds_count",
                     "pacs_ai_receive_to_delivery_seconds_bucket", "pacs_ai_backlog_jobs"):
        assert expected in names, f"{expected} missing from /metrics"


def test_counters_histograms_and_gauge_reach_the_scrape(healthy_server):
    before = scrape(healthy_server)

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    metrics.RECEIVED.inc()
    metrics.RECEIVED.inc()
    metrics.SKIPPED.labels(reason=metrics.reason_code("view_position: LATERAL")).inc()
    metrics.CLASSIFIED.labels(finding="PNEUMONIA").inc()
    metrics.REPORTED.labels(destination="PACS").inc()
    metrics.FAILED.labels(stage="deliver").inc()
    metrics.REJECTED.labels(reason="calling_ae").inc()
    metrics.CLASSIFY_SECONDS.observe(0.2)
    metrics.RECEIVE_TO_DELIVERY_SECONDS.observe(42.0)
    metrics.BACKLOG.set(7)

    after = scrape(healthy_server)
    increments = {
        ("pacs_ai_received_total", ()): 2,
        ("pacs_ai_skipped_total", (("reason", "view_position"),)): 1,
        ("pacs_ai_classified_total", (("finding", "PNEUMONIA"),)): 1,
        ("pacs_ai_reported_total", (("destination", "PACS"),)): 1,
        ("pacs_ai_failed_total", (("stage", "deliver"),)): 1,
        ("pacs_ai_rejected_total", (("reason", "calling_ae"),)): 1,
        ("pacs_ai_classify_seconds_count", ()): 1,
        ("pacs_ai_receive_to_delivery_seconds_count", ()): 1,
    }
    for key, increment in increments.items():
        assert after[key] - before.get(key, 0.0) == increment, key
    # 0.2 s falls in the 0.25 bucket and not in the 0.1 one.
    le = lambda bound: value(after, "pacs_ai_classify_seconds_bucket", le=bound) - value(  # noqa: E731
        before, "pacs_ai_classify_seconds_bucket", le=bound)
    assert le("0.25") == 1 and le("0.1") == 0
    assert value(after, "pacs_ai_backlog_jobs") == 7


def test_reason_code_keeps_only_the_code():
    assert metrics.reason_code("modality: MR is not CR/DX") == "modality"
    assert metrics.reason_code("frames:3") == "frames"
    assert metrics.reason_code("no_colon") == "no_colon"
    assert metrics.reason_code("") == "unknown"


def test_healthz_is_200_with_the_callback_json(healthy_server):
    status, content_type, body = http_get(healthy_server.url + "/healthz")
    assert status == 200
    assert content_type == "application/json"
    assert json.loads(body) == {"ok": True, "backlog": 0}


def test_healthz_is_503_when_not_ok():
    server = http_server.start_http_server(
        "127.0.0.1", 0, lambda: {"ok": False, "problems": ["spool below free-space floor"]})
    try:
        status, _type, body = http_get(server.url + "/healthz")
    finally:
        server.shutdown()
    assert status == 503
    assert json.loads(body)["problems"] == ["spool below free-space floor"]


def test_a_raising_health_callback_gives_503_and_the_server_keeps_serving():
    def broken_health() -> dict:
        raise RuntimeError("database is locked")

    server = http_server.start_http_server("127.0.0.1", 0, broken_health)
    try:
        status, _type, body = http_get(server.url + "/healthz")
        assert status == 503
        report = json.loads(body)
        assert report["ok"] is False and "database is locked" in report["error"]
        assert http_get(server.url + "/metrics")[0] == 200
    finally:
        server.shutdown()


def test_readyz_answers_its_own_callback_and_metrics_are_refreshed_first():
    ready = {"ok": False, "problems": ["spool-below-floor: 0 bytes free"]}
    refreshed = []

    def refresh() -> None:
        refreshed.append(True)
        metrics.SPOOL_FREE_BYTES.set(12345)

    server = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True},
                                          lambda: ready, refresh)
    try:
        assert http_get(server.url + "/healthz")[0] == 200
        status, content_type, body = http_get(server.url + "/readyz")
        assert status == 503 and content_type == "application/json"
        assert json.loads(body)["problems"] == ready["problems"]
        ready["ok"], ready["problems"] = True, []
        assert http_get(server.url + "/readyz")[0] == 200
        assert refreshed == []  # only a scrape refreshes the gauges
        assert scrape(server)[("pacs_ai_spool_free_bytes", ())] == 12345
        assert refreshed == [True]
    finally:
        server.shutdown()


def test_a_failing_refresh_still_serves_the_metrics():
    def refresh() -> None:
        raise RuntimeError("queue locked")

    server = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True}, refresh=refresh)
    try:
        assert "pacs_ai_received_total" in {name for name, _labels in scrape(server)}
        assert http_get(server.url + "/readyz")[0] == 200  # without its own callback: /healthz's
    finally:
        server.shutdown()


def test_unknown_path_is_404(healthy_server):
    assert http_get(healthy_server.url + "/")[0] == 404


def test_two_servers_in_one_process_and_shutdown_frees_the_port():
    first = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True})
    second = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": False})
    try:
        assert first.port != second.port
        assert http_get(first.url + "/healthz")[0] == 200
        assert http_get(second.url + "/healthz")[0] == 503
    finally:
        second.shutdown()
    port = first.port
    first.shutdown()
    first.shutdown()  # idempotent
    with socket.create_server(("127.0.0.1", port)):  # the port is free again
        pass


def test_port_in_use_is_a_user_error_naming_the_fix():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=r"\[metrics\] port"):
            http_server.start_http_server("127.0.0.1", port, lambda: {"ok": True})
