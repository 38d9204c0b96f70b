"""The optional periodic C-ECHO to each destination (issue 14 item 4): config, one echo against
a real Orthanc up, stopped and back, and the service showing the result in `pacs-ai status`,
/healthz and the metrics."""

from __future__ import annotations

import html
import json
import re
import threading
import urllib.request

import pytest
import structlog.testing

from pacs_ai.config import ConfigError, parse_config
from pacs_ai.deliver.destination_echo import DestinationEcho
from pacs_ai.ops import metrics
from pacs_ai.queue.echo_results import EchoResults, load_results
from testbed.dicom_peers import (LOCALHOST, ServiceProcess, free_port, pacs_ai_cli, wait_until,
                                 write_service_config)
from testbed.real_peers import Orthanc, orthanc_destination


def destination(**extra) -> dict:
    return {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, **extra}


def test_echo_interval_config(tmp_path):
    [default] = parse_config({"destinations": [destination()]}, base_dir=tmp_path).destinations
    assert default.echo_interval_seconds == 0
    [every] = parse_config({"destinations": [destination(echo_interval_seconds=300)]},
                           base_dir=tmp_path).destinations
    assert every.echo_interval_seconds == 300.0
    with pytest.raises(ConfigError, match=r"echo_interval_seconds: must be 0 .* at least 10"):
        parse_config({"destinations": [destination(echo_interval_seconds=2)]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"echo_interval_seconds"):
        parse_config({"destinations": [{"kind": "dicomweb", "url": "http://pacs/dicom-web",
                                        "echo_interval_seconds": 60}]}, base_dir=tmp_path)


def echo_gauge(name: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("pacs_ai_destination_echo_ok",
                                             {"destination": name})


@pytest.mark.real_peer
def test_echo_against_orthanc_up_stopped_and_back(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    config = parse_config({"destinations": [orthanc_destination(
        orthanc, name="echo-orthanc", echo_interval_seconds=60, timeout_seconds=5)]},
        base_dir=tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    echo = DestinationEcho(config.destinations[0], EchoResults(spool), threading.Event())
    with structlog.testing.capture_logs() as logs:
        with orthanc:
            up = echo.echo_once()
        assert up.ok and up.detail == "0x0000" and up.failing_since is None, up
        assert echo_gauge("echo-orthanc") == 1
        assert load_results(spool)["echo-orthanc"]["ok"] is True

        down = echo.echo_once()  # Orthanc stopped: nothing listens on its port
        again = echo.echo_once()
        assert not down.ok and down.detail.startswith("connection-failed"), down
        assert again.failing_since == down.failing_since == down.at  # failing since the first
        assert echo_gauge("echo-orthanc") == 0
        assert load_results(spool)["echo-orthanc"]["detail"].startswith("connection-failed")

        with orthanc:  # back on the same port
            back = echo.echo_once()
        assert back.ok
    events = [entry["event"] for entry in logs]
    assert events == ["echo_failed", "echo_recovered"], logs  # on each change, not each echo


def health_everywhere(config, metrics_port: int, name: str) -> dict[str, tuple[str, str]]:
    """A destination's health word and reason as each place shows it: `pacs-ai status` (text
    and --json), /healthz, /api/queue and the /queue page. Each run of digits becomes one # in
    the reasons, as a second or an echo's time may pass between the reads (9 s, then 10 s)."""
    def read(path: str):
        with urllib.request.urlopen(f"http://{LOCALHOST}:{metrics_port}{path}",
                                    timeout=10) as answer:
            return answer.read().decode()

    def entry(state: dict) -> tuple[str, str]:
        return state["health"], state["health_detail"]

    found = {"status --json": entry(json.loads(pacs_ai_cli(
        "status", "--config", str(config), "--json").stdout)["destinations"][name])}
    text = pacs_ai_cli("status", "--config", str(config)).stdout
    block = text[text.index(f"  {name}: reports"):]
    line = re.search(r"^    health (\w+)(?:: (.*))?$", block, flags=re.M)
    found["status"] = (line.group(1), line.group(2) or "")
    found["/healthz"] = entry(json.loads(read("/healthz"))["destinations"][name])
    found["/api/queue"] = entry(json.loads(read("/api/queue"))["destinations"][name])
    row = re.search(rf"<tr id=destination-{re.escape(name)}>.*?</tr>", read("/queue"), re.S)
    cell = re.search(r'<td class=(\w+) title="([^"]*)">(\w+)<br>', row.group(0))
    assert cell.group(1) == cell.group(3), row.group(0)
    found["/queue"] = (cell.group(3), html.unescape(cell.group(2)))
    return {where: (word, re.sub(r"\d+", "#", detail)) for where, (word, detail) in found.items()}


@pytest.mark.real_peer
def test_service_shows_the_echo_in_status_healthz_and_metrics(tmp_path, tiny_model):
    """pacs-ai serve echoes Orthanc at start-up (ok in status, /healthz, metrics); Orthanc
    stopped, the next echo 10 s later fails, and status then says so and exits 1 (over
    [status] destination_failing_seconds = 0)."""
    orthanc = Orthanc(tmp_path / "orthanc")
    folder = tmp_path / "service"
    folder.mkdir()
    metrics_port = free_port()
    config = write_service_config(
        folder, model=tiny_model,
        destinations=[orthanc_destination(orthanc, echo_interval_seconds=10, timeout_seconds=5)],
        tables={"metrics": {"enabled": True, "host": LOCALHOST, "port": metrics_port},
                "status": {"destination_failing_seconds": 0}})

    def status() -> tuple[int, dict]:
        result = pacs_ai_cli("status", "--config", str(config), "--json")
        return result.returncode, json.loads(result.stdout)

    def healthz() -> dict:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{metrics_port}/healthz",
                                    timeout=10) as answer:
            return json.loads(answer.read())

    with orthanc, ServiceProcess(config, folder / "serve.log") as service:
        assert wait_until(lambda: status()[1]["destinations"]["orthanc"]["echo"]["ok"], 30)
        code, report = status()
        assert code == 0, report["needs_admin"]
        echo = healthz()["destinations"]["orthanc"]["echo"]
        assert echo["ok"] is True and echo["at"], echo
        text = pacs_ai_cli("status", "--config", str(config)).stdout
        assert "echo ok at " in text, text
        with urllib.request.urlopen(f"http://{LOCALHOST}:{metrics_port}/metrics",
                                    timeout=10) as answer:
            exposition = answer.read().decode()
        assert 'pacs_ai_destination_echo_ok{destination="orthanc"} 1.0' in exposition
        # Issue 23 item 5: one health, the same everywhere.
        seen = health_everywhere(config, metrics_port, "orthanc")
        assert set(seen.values()) == {("ok", "C-ECHO ok at #-#-#T#:#:#+#:#")}, seen

        orthanc.stop()
        assert wait_until(lambda: status()[1]["destinations"]["orthanc"]["echo"]["ok"] is False,
                          40), "the echo after Orthanc stopped did not fail"
        code, report = status()
        echo = healthz()["destinations"]["orthanc"]["echo"]
        assert echo["ok"] is False and echo["detail"].startswith("connection-failed"), echo
        assert code == 1 and any(reason.startswith("destination-echo-failing: orthanc")
                                 for reason in report["needs_admin"]), report["needs_admin"]
        text = pacs_ai_cli("status", "--config", str(config)).stdout
        assert "echo FAILED at " in text and "connection-failed" in text, text
        # With the PACS down and nothing waiting, every place says failing, for the C-ECHO
        # (the queue page said "ok" and /api/queue "no C-ECHO yet").
        seen = health_everywhere(config, metrics_port, "orthanc")
        [(word, detail)] = set(seen.values())
        assert word == "failing" and detail.startswith("C-ECHO failing for "), seen
        assert "connection-failed" in detail, seen
        assert [e["event"] for e in service.events()
                if e.get("event") in ("echo_failed", "echo_recovered")] == ["echo_failed"]
