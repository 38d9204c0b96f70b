"""Health that tells the truth (issue 14, item 4): /healthz (live) and /readyz (ready to take
films) from a running service, delivery health per destination in /healthz, the metrics and
`pacs-ai status`, whose exit status says when something needs an admin.

The service runs in this process with its metrics server on a free port; modalities and PACSs
are pynetdicom peers on 127.0.0.1, a PACS that is down is a closed port.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pacs_ai.config import load_config
from pacs_ai.service import Service
from testbed.dicom_peers import (RecordingPacs, SimulatedModality, free_port, pacs_ai_cli,
                                 synthetic_radiograph, wait_until, write_service_config)
from testbed.job_queue import all_jobs


def get(service: Service, path: str) -> tuple[int, dict | str]:
    url = f"http://127.0.0.1:{service.http_server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read().decode()
    return status, (body if path == "/metrics" else json.loads(body))


def scrape(service: Service) -> dict[tuple[str, tuple], float]:
    status, body = get(service, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def start(tmp_path: Path, model: Path, *, destinations=(), **tables) -> tuple[Service, Path]:
    tables.setdefault("metrics", {}).update({"enabled": True, "port": 0})
    config_path = write_service_config(tmp_path, model=model, destinations=destinations,
                                       tables=tables)
    return Service(load_config(config_path)).start(), config_path


def status(config: Path) -> tuple[int, dict, str]:
    """`pacs-ai status --json` (exit status, report) and the text form's output."""
    as_json = pacs_ai_cli("status", "--config", str(config), "--json")
    text = pacs_ai_cli("status", "--config", str(config))
    assert as_json.returncode == text.returncode, (as_json.stderr, text.stderr)
    return as_json.returncode, json.loads(as_json.stdout), text.stdout


def test_a_working_service_is_live_and_ready_and_status_exits_0(tmp_path, tiny_model):
    service, config = start(tmp_path, tiny_model)
    try:
        live, body = get(service, "/healthz")
        assert live == 200 and body["ok"] and body["ready"] and body["needs_admin"] == []
        ready, body = get(service, "/readyz")
        assert ready == 200 and body["ok"] and body["problems"] == []
        assert body["spool"]["writable"] and body["model"] == service.model.info.label
        samples = scrape(service)
        assert samples[("pacs_ai_ready", ())] == 1
        assert samples[("pacs_ai_spool_free_bytes", ())] > 0
        info = service.model.info
        assert samples[("pacs_ai_model_info", (("name", info.name), ("role", "live"),
                                               ("version", info.version)))] == 1
        code, report, _text = status(config)
        assert code == 0 and report["needs_admin"] == []
    finally:
        service.stop()


def test_a_spool_below_the_floor_is_not_ready_but_live(tmp_path, tiny_model):
    """Every store is refused with 0xA700 then: /readyz must say so, /healthz must not (a
    restart would not free the disk)."""
    (tmp_path / "spool").mkdir()
    floor = shutil.disk_usage(tmp_path / "spool").free + 10**12  # always above what is free
    service, config = start(tmp_path, tiny_model, storage={"min_free_bytes": floor})
    try:
        [result] = SimulatedModality(service.port).send([synthetic_radiograph()])
        assert result.status == 0xA700  # what readiness has to predict
        ready, body = get(service, "/readyz")
        assert ready == 503 and not body["ok"]
        [problem] = body["problems"]
        assert problem.startswith("spool-below-floor:") and str(floor) in problem
        live, body = get(service, "/healthz")
        assert live == 200 and body["ok"] and body["ready"] is False
        codes = lambda problems: [p.split(":")[0] for p in problems]  # noqa: E731 (free bytes vary)
        assert codes(body["not_ready"]) == codes(body["needs_admin"]) == ["spool-below-floor"]
        assert body["spool"]["free_bytes"] < body["spool"]["min_free_bytes"] == floor
        samples = scrape(service)
        assert samples[("pacs_ai_ready", ())] == 0
        assert samples[("pacs_ai_spool_free_bytes", ())] < floor
        code, report, text = status(config)
        assert code == 1 and codes(report["needs_admin"]) == ["spool-below-floor"]
        assert "needs admin:" in text and "spool-below-floor" in text
    finally:
        service.stop()


def make_unwritable(folder: Path) -> str:
    """Make new files in `folder` fail. Permissions do not stop root, so as root the folder is
    replaced by a plain file (creating a file in it then fails with ENOTDIR)."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return "permissions"
    folder.rename(folder.with_name(folder.name + ".away"))
    folder.write_bytes(b"")
    return "folder replaced by a file"


def restore(folder: Path) -> None:
    if folder.is_file():
        folder.unlink()
        folder.with_name(folder.name + ".away").rename(folder)
    else:
        folder.chmod(0o750)


def test_an_unwritable_spool_is_not_ready_but_live_and_ready_again_once_fixed(tmp_path,
                                                                             tiny_model):
    service, config = start(tmp_path, tiny_model)
    incoming = service.spool.incoming
    try:
        assert get(service, "/readyz")[0] == 200
        how = make_unwritable(incoming)
        print(f"spool made unwritable: {how}")
        [result] = SimulatedModality(service.port).send([synthetic_radiograph(seed=5)])
        assert result.status is not None and 0xA700 <= result.status <= 0xA7FF
        ready, body = get(service, "/readyz")
        assert ready == 503 and not body["spool"]["writable"]
        assert [p.split(":")[0] for p in body["problems"]] == ["spool-unwritable"]
        assert str(incoming) in body["problems"][0]
        live, body = get(service, "/healthz")
        assert live == 200 and body["ok"] and body["ready"] is False
        code, report, _text = status(config)
        assert code == 1 and report["needs_admin"][0].startswith("spool-unwritable:")
        restore(incoming)
        ready, body = get(service, "/readyz")
        assert ready == 200, body
        assert SimulatedModality(service.port).send([synthetic_radiograph(seed=5)])[0].status == 0
    finally:
        if incoming.is_file() or not os.access(incoming, os.W_OK):
            restore(incoming)
        service.stop()


def test_stopping_is_not_ready(tmp_path, tiny_model):
    service, _config = start(tmp_path, tiny_model)
    try:
        service._draining = True  # what stop() sets first, before it closes anything
        ready, body = get(service, "/readyz")
        assert ready == 503 and body["problems"] == ["draining: the service is stopping"]
        assert get(service, "/healthz")[0] == 200
    finally:
        service._draining = False
        service.stop()


def test_before_start_it_is_not_ready_and_names_the_model_and_the_listener(tmp_path, tiny_model):
    """/readyz's other codes (issue 16 item 4): a service whose model is not loaded and whose
    listener is not up takes no films. Start-up opens the metrics server only after loading
    the model, so a running service never shows model-not-loaded: a load balancer's check meets
    a closed port until then, which counts as not ready too."""
    service = Service(load_config(write_service_config(tmp_path, model=tiny_model)))
    body = service.readiness()
    assert body["ok"] is False and body["model"] is None and body["listening"] is False
    assert [p.split(":")[0] for p in body["problems"]][:2] == ["listener-down", "model-not-loaded"]
    service.start()
    try:
        assert service.readiness()["ok"] is True
    finally:
        service.stop()
    assert "draining: the service is stopping" in service.readiness()["problems"]


@pytest.mark.slow
def test_a_pacs_that_is_down_shows_in_healthz_metrics_and_status_until_it_is_back(tmp_path,
                                                                                tiny_model):
    pacs = RecordingPacs(port=free_port(), ae_title="PACS")  # not started: a closed port
    service, config = start(
        tmp_path, tiny_model, destinations=[pacs.destination(name="main-pacs")],
        status={"destination_failing_seconds": 1},
        retry={"initial_delay_seconds": 0.2, "max_delay_seconds": 0.5, "max_attempts": 0,
               "max_age_seconds": 600})
    try:
        state = get(service, "/healthz")[1]["destinations"]["main-pacs"]
        assert (state["health"], state["health_detail"]) == ("unknown", "no report sent yet")
        [result] = SimulatedModality(service.port).send([synthetic_radiograph(seed=7)])
        assert result.status == 0
        # Failing past [status] destination_failing_seconds (1 s).
        assert wait_until(lambda: get(service, "/healthz")[1]["destinations"]["main-pacs"]
                          ["failing_too_long"], 30)
        live, body = get(service, "/healthz")
        assert live == 200 and body["ok"]  # a restart would not bring the PACS back
        assert get(service, "/readyz")[0] == 200  # films are still taken and kept
        state = body["destinations"]["main-pacs"]
        assert state["last_success_at"] is None and state["pending"] == 1
        assert state["failing_seconds"] > 1 and "connection-failed" in state["last_error"]
        assert state["oldest_pending_seconds"] > 1
        assert state["health"] == "failing"
        assert state["health_detail"].startswith("deliveries failing for ")
        assert state["health_detail"].endswith(state["last_error"])
        assert body["oldest_pending_delivery_seconds"] == state["oldest_pending_seconds"]
        [reason] = body["needs_admin"]
        assert reason.startswith("destination-failing: main-pacs")
        samples = scrape(service)
        labels = (("destination", "main-pacs"),)
        assert samples[("pacs_ai_oldest_pending_delivery_seconds", labels)] > 1
        assert samples[("pacs_ai_destination_failing_seconds", labels)] > 1
        assert samples[("pacs_ai_last_delivery_timestamp_seconds", labels)] == 0
        code, report, text = status(config)
        assert code == 1 and report["needs_admin"][0].startswith("destination-failing: main-pacs")
        assert report["destinations"]["main-pacs"]["failing_too_long"]
        assert "failing for" in text and "needs admin:" in text

        with pacs:  # the PACS comes back: the report is delivered and the alarm clears
            assert pacs.wait_for(1, timeout=30)
            assert wait_until(lambda: get(service, "/healthz")[1]["destinations"]["main-pacs"]
                              ["pending"] == 0, 30)
            live, body = get(service, "/healthz")
            state = body["destinations"]["main-pacs"]
            assert state["failing_since"] is None and state["last_success_at"] is not None
            assert state["health"] == "ok"
            assert state["health_detail"] == f"last report stored {state['last_success_at']}"
            assert body["needs_admin"] == [] and body["oldest_pending_delivery_seconds"] is None
            samples = scrape(service)
            assert samples[("pacs_ai_oldest_pending_delivery_seconds", labels)] == 0
            assert samples[("pacs_ai_destination_failing_seconds", labels)] == 0
            assert abs(samples[("pacs_ai_last_delivery_timestamp_seconds", labels)]
                       - time.time()) < 60
            code, report, _text = status(config)
            assert code == 0 and report["needs_admin"] == []
    finally:
        service.stop()


def test_one_health_word_from_deliveries_and_echo_alike():
    """destination_health's table: a failure of either kind is "retrying" until [status]
    destination_failing_seconds, then "failing"; "ok" needs a delivery or an echo that
    worked; "unknown" before either."""
    from pacs_ai.ops.health import HEALTH_WORDS, destination_health

    quiet = {"failing_since": None, "failing_seconds": None, "failing_too_long": False,
             "last_error": None, "last_success_at": None, "echo": None}
    stored = {**quiet, "last_success_at": "2026-12-07T00:00:00+00:00"}
    failing = {**stored, "failing_since": "2026-12-07T00:01:00+00:00", "failing_seconds": 30.0,
               "last_error": "connection-failed: PACS@pacs:104"}
    echo_down = {"ok": False, "at": "2026-12-07T00:02:00+00:00", "detail": "connection-failed",
                 "failing_seconds": 40.0, "failing_too_long": False}
    echo_up = {"ok": True, "at": "2026-12-07T00:02:00+00:00", "detail": "0x0000",
               "failing_seconds": None, "failing_too_long": False}
    no_echo_yet = {"ok": None, "at": None, "detail": "no C-ECHO yet", "failing_seconds": None,
                   "failing_too_long": False}
    cases = [
        (quiet, "unknown", "no report sent yet"),
        ({**quiet, "echo": no_echo_yet}, "unknown", "no C-ECHO answered yet"),
        (stored, "ok", "last report stored 2026-12-07T00:00:00+00:00"),
        ({**quiet, "echo": echo_up}, "ok", "C-ECHO ok at 2026-12-07T00:02:00+00:00"),
        (failing, "retrying", "deliveries failing for 30 s: connection-failed: PACS@pacs:104"),
        ({**failing, "failing_too_long": True}, "failing", "deliveries failing for 30 s: "
                                                           "connection-failed: PACS@pacs:104"),
        ({**quiet, "echo": echo_down}, "retrying", "C-ECHO failing for 40 s: connection-failed"),
        ({**stored, "echo": {**echo_down, "failing_too_long": True}}, "failing",
         "C-ECHO failing for 40 s: connection-failed"),
    ]
    for state, word, detail in cases:
        assert destination_health(state) == (word, detail), state
        assert word in HEALTH_WORDS


def test_failed_jobs_make_status_exit_1_within_the_configured_window(tmp_path, tiny_model):
    from tests.hostile_input import undecodable

    service, config = start(tmp_path, tiny_model)
    try:
        broken = undecodable(synthetic_radiograph(seed=3))  # well formed, so acknowledged
        assert SimulatedModality(service.port).send([broken])[0].status == 0
        assert wait_until(lambda: service.store.job_counts()["failed"] == 1, 60)
        code, report, text = status(config)
        assert code == 1 and report["needs_admin"][0].startswith("failed-images: 1 image(s)")
        assert get(service, "/healthz")[1]["needs_admin"] == report["needs_admin"]
    finally:
        service.stop()
    # Older than the window: no longer an alarm (still listed under latest failures).
    config = write_service_config(tmp_path, model=tiny_model,
                                  tables={"status": {"failed_jobs_within_seconds": 0.001}})
    time.sleep(0.01)
    code, report, _text = status(config)
    assert code == 0 and report["needs_admin"] == [] and len(report["failures"]) == 1


@pytest.mark.real_peer
def test_a_film_too_large_to_decode_is_refused_and_status_stays_green(tmp_path, tiny_model):
    """Issue 23 item 3: storescu sends a JPEG 2000 film whose header declares 60000 x 60000
    pixels. It was answered Success, its job failed too-large, and `pacs-ai status` exited 1
    for a day advising `pacs-ai retry`, which cannot fix it. Now it is refused (0xC000, the
    modality keeps it and shows the error), counted, and status stays 0."""
    from pydicom.uid import JPEG2000Lossless

    from testbed.real_peers import propose_as_stored, storescu
    from tests.hostile_input import declaring

    film = tmp_path / "oversize.dcm"
    declaring(synthetic_radiograph(seed=12, transfer_syntax=JPEG2000Lossless),
              60000, 60000).save_as(film, enforce_file_format=True)
    service, config = start(tmp_path, tiny_model)
    too_large = ("pacs_ai_rejected_total", (("reason", "too-large"),))
    try:
        before = scrape(service).get(too_large, 0)  # other tests in this process count too
        run = storescu(service.port, [film], called_ae="PACS_AI",
                       extra=propose_as_stored([film], tmp_path / "as-stored.cfg"))
        print(run.output)
        assert run.responses == [(str(film), "Error: CannotUnderstand")]
        assert scrape(service)[too_large] - before == 1
        assert all_jobs(service.store) == []
        time.sleep(1.5)  # a worker would have failed an acknowledged one by now
        code, report, _text = status(config)
        assert code == 0 and report["needs_admin"] == [] and report["jobs"]["failed"] == 0
        assert get(service, "/healthz")[1]["needs_admin"] == []
    finally:
        service.stop()


def test_an_admin_dismisses_a_failure_no_retry_can_fix(tmp_path, tiny_model):
    """Issue 23 item 3: a film that is whole on the wire but that no decoder can read is
    acknowledged, then fails decode-failed; a report whose PACS is down fails at delivery.
    status tells the two apart: `pacs-ai retry` for the delivery, not for the image. After
    `pacs-ai dismiss` of the image, status calls only for the delivery, lists the image as
    dismissed (text, --json, /api/queue), and `pacs-ai retry` leaves it failed."""
    from tests.hostile_input import undecodable

    down = {"name": "main-pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    service, config = start(tmp_path, tiny_model, destinations=[down],
                            retry={"max_attempts": 1})
    try:
        broken = undecodable(synthetic_radiograph(seed=3))
        good = synthetic_radiograph(seed=4)
        assert [r.status for r in SimulatedModality(service.port).send([broken, good])] == [0, 0]
        assert wait_until(lambda: service.store.job_counts()["failed"] == 2, 60)
        code, report, text = status(config)
        print(text)
        assert code == 1
        fixable, in_image = report["needs_admin"]
        assert fixable.startswith("failed-jobs: 1 job(s) failed") and "`pacs-ai retry`" in fixable
        assert in_image.startswith("failed-images: 1 image(s) failed") and \
            "(decode-failed 1); `pacs-ai retry` cannot fix that" in in_image
        assert {f["sop_instance_uid"]: f["retry_can_fix"] for f in report["failures"]} == \
            {str(broken.SOPInstanceUID): False, str(good.SOPInstanceUID): True}

        refused = pacs_ai_cli("dismiss", "--config", str(config), "2.25.1")
        assert refused.returncode == 2 and "no failed job 2.25.1" in refused.stderr
        done = pacs_ai_cli("dismiss", "--config", str(config), str(broken.SOPInstanceUID))
        print(done.stdout)
        assert done.returncode == 0, done.stderr
        assert f"{broken.SOPInstanceUID} [classify] decode-failed" in done.stdout
        assert "dismissed 1 failed job(s)" in done.stdout

        code, report, text = status(config)
        print(text)
        assert code == 1 and report["needs_admin"] == [fixable]
        assert report["dismissed"] == 1 and report["jobs"]["failed"] == 2
        [seen] = [f for f in report["failures"] if f["dismissed_at"]]
        assert seen["sop_instance_uid"] == str(broken.SOPInstanceUID)
        assert "| failed 2 (1 dismissed)" in text
        assert f"{broken.SOPInstanceUID} [classify]" in text and "(dismissed 20" in text
        films = {f["job"]: f for f in get(service, "/api/queue")[1]["films"]}
        assert films[seen["job"]]["dismissed_at"] == seen["dismissed_at"]
        assert films[seen["job"]]["state"] == "failed"

        retried = pacs_ai_cli("retry", "--config", str(config))
        assert "requeued 1 failed job(s)" in retried.stdout, retried.stdout
        assert service.store.find(str(broken.SOPInstanceUID)).state == "failed"
        assert wait_until(lambda: service.store.job_counts()["failed"] == 2, 60)
        dismissed_all = pacs_ai_cli("dismiss", "--config", str(config), "--all")
        assert "dismissed 1 failed job(s)" in dismissed_all.stdout
        code, report, _text = status(config)
        assert code == 0 and report["needs_admin"] == [] and report["dismissed"] == 2
    finally:
        service.stop()
