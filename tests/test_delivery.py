"""Delivering reports: a PACS that is down, comes back, refuses, or is one of two.

`pacs-ai serve` runs as a subprocess with retry delays of ~0.2 s (doubling up to 1 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacs_ai.report.report import report_summary
from testbed.dicom_peers import (RecordingPacs, ServiceProcess, SimulatedModality, free_port,
                                 pacs_ai_cli, synthetic_radiograph, wait_until,
                                 write_service_config)


def status(config: Path) -> dict:
    result = pacs_ai_cli("status", "--config", str(config), "--json", "--limit", "50")
    # 1: something needs an admin (failed jobs, a destination failing too long), as here often.
    assert result.returncode in (0, 1), result.stderr
    assert result.returncode == (1 if json.loads(result.stdout)["needs_admin"] else 0)
    return json.loads(result.stdout)


def send_films(port: int, count: int, seed: int = 0) -> set[str]:
    datasets = [synthetic_radiograph(seed=seed + n) for n in range(count)]
    results = SimulatedModality(port).send(datasets)
    assert all(r.acknowledged for r in results), results
    return {str(ds.SOPInstanceUID) for ds in datasets}


def reported_sources(pacs: RecordingPacs) -> list[str]:
    return [report_summary(sr)["source_sop_instance_uid"] for sr in pacs.snapshot()]


def retrying_attempts(config: Path) -> int:
    return max((item["attempts"] for item in status(config)["retrying"]), default=0)


@pytest.mark.slow
def test_destination_down_then_up_delivers_everything_once(tmp_path, tiny_model):
    pacs = RecordingPacs(port=free_port())  # not started yet: the PACS is down
    config = write_service_config(tmp_path, model=tiny_model, destinations=[pacs.destination()])
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        sources = send_films(service.port, 4)
        assert wait_until(lambda: retrying_attempts(config) >= 5, 30)
        report = status(config)
        assert report["jobs"]["delivering"] == 4 and report["backlog"] == 4
        assert all("connection-failed" in item["last_error"] for item in report["retrying"])
        first_report = report["retrying"][0]["report_uid"]

        def delays() -> list[float]:
            return [event["retry_in_seconds"] for event in service.events()
                    if event["event"] == "delivery_retry_scheduled"
                    and event["report_uid"] == first_report]
        # the sender commits an attempt to the queue before it logs it: wait for the lines
        wait_until(lambda: len(delays()) >= 5, 10)
        # The initial delay, doubling, capped at max_delay_seconds.
        assert delays()[:5] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0], abs=0.01)
        with pacs:
            assert pacs.wait_for(4, timeout=30)
            assert wait_until(lambda: status(config)["jobs"]["done"] == 4, 30)
            assert service.terminate() == 0
    assert sorted(reported_sources(pacs)) == sorted(sources)


@pytest.mark.slow
def test_a_down_destination_blocks_neither_receiving_nor_the_other_destination(tmp_path,
                                                                               tiny_model):
    down = RecordingPacs(port=free_port(), ae_title="DOWN")  # never started
    with RecordingPacs(ae_title="UP") as up:
        config = write_service_config(
            tmp_path, model=tiny_model,
            destinations=[down.destination(name="down"), up.destination(name="up")])
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            first = send_films(service.port, 3)
            assert up.wait_for(3, timeout=30)
            second = send_films(service.port, 3, seed=50)  # still received while one is down
            assert up.wait_for(6, timeout=30)
            report = status(config)
            assert report["deliveries"]["up"]["done"] == 6
            assert report["deliveries"]["down"]["done"] == 0
            assert report["deliveries"]["down"]["pending"] == 6
            assert report["jobs"]["delivering"] == 6  # finished only when both have it
            assert service.terminate() == 0
    assert sorted(reported_sources(up)) == sorted(first | second)


@pytest.mark.slow
def test_delivery_gives_up_at_the_limit_with_its_reason_and_retry_requeues(tmp_path,
                                                                           tiny_model):
    pacs = RecordingPacs(port=free_port())
    config = write_service_config(tmp_path, model=tiny_model, destinations=[pacs.destination()],
                                  tables={"retry": {"max_attempts": 3}})
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        sources = send_films(service.port, 2)
        assert wait_until(lambda: status(config)["jobs"]["failed"] == 2, 30)
        failures = status(config)["failures"]
        assert {f["sop_instance_uid"] for f in failures} == sources
        for failure in failures:
            assert failure["stage"] == "deliver"
            assert "connection-failed" in failure["reason"] and pacs.ae_title in failure["reason"]
        text = pacs_ai_cli("status", "--config", str(config)).stdout
        assert "latest failures:" in text and "connection-failed" in text
        assert sum(event["event"] == "delivery_failed" for event in service.events()) == 2

        with pacs:
            result = pacs_ai_cli("retry", "--config", str(config))
            assert result.returncode == 0 and "requeued 2 failed job(s)" in result.stdout
            assert pacs.wait_for(2, timeout=30)  # the running service picks them up
            assert wait_until(lambda: status(config)["jobs"]["done"] == 2, 30)
            assert service.terminate() == 0
    assert sorted(reported_sources(pacs)) == sorted(sources)


@pytest.mark.slow
def test_a_pacs_refusing_the_report_is_recorded_with_its_status(tmp_path, tiny_model):
    with RecordingPacs(answer_status=0xA700) as pacs:
        config = write_service_config(tmp_path, model=tiny_model,
                                      destinations=[pacs.destination()],
                                      tables={"retry": {"max_attempts": 2}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            send_films(service.port, 1)
            assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 30)
            [failure] = status(config)["failures"]
            assert "refused: status 0xA700" in failure["reason"]
            assert service.terminate() == 0


@pytest.mark.slow
def test_backoff_continues_across_a_restart(tmp_path, tiny_model):
    pacs = RecordingPacs(port=free_port())
    config = write_service_config(tmp_path, model=tiny_model, destinations=[pacs.destination()],
                                  tables={"retry": {"initial_delay_seconds": 0.5,
                                                    "max_delay_seconds": 0.5}})
    log_path = tmp_path / "serve.log"
    with ServiceProcess(config, log_path) as service:
        sources = send_films(service.port, 1)
        assert wait_until(lambda: retrying_attempts(config) >= 2, 30)
        assert service.terminate() == 0
    attempts_before = retrying_attempts(config)
    with ServiceProcess(config, log_path) as restarted:
        assert wait_until(lambda: retrying_attempts(config) > attempts_before, 30)
        after_restart = [event["attempts"] for event in restarted.events()
                         if event["event"] == "delivery_retry_scheduled"]
        assert after_restart[-1] > attempts_before  # counted on, not started again
        with pacs:
            assert pacs.wait_for(1, timeout=30)
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 30)
            assert restarted.terminate() == 0
    assert reported_sources(pacs) == list(sources)


@pytest.mark.slow
def test_resending_an_image_whose_report_could_not_be_delivered_delivers_it(tmp_path,
                                                                            tiny_model):
    """A modality re-sends when it sees no result; if the report was given up on (here the
    PACS refused it), the re-send delivers that report again, without classifying again."""
    with RecordingPacs(answer_status=0xA700) as pacs:
        config = write_service_config(tmp_path, model=tiny_model,
                                      destinations=[pacs.destination()],
                                      tables={"retry": {"max_attempts": 1}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            film = synthetic_radiograph(seed=77)
            assert SimulatedModality(service.port).send([film])[0].acknowledged
            assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 30)
            assert pacs.snapshot() == []

            pacs.answer_status = 0x0000  # the PACS is fixed; the modality sends again
            assert SimulatedModality(service.port).send([film])[0].acknowledged
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 30), status(config)
            assert reported_sources(pacs) == [str(film.SOPInstanceUID)]
            events = service.events()
            assert sum(e["event"] == "instance_classified" for e in events) == 1
            assert any(e["event"] == "redelivery_requested" for e in events)
            assert service.terminate() == 0


def waiting_until(config: Path) -> dict[str, float]:
    """Report UID -> when its next attempt is scheduled (Unix time), of deliveries retrying."""
    from datetime import datetime

    return {item["report_uid"]: datetime.fromisoformat(item["next_attempt_at"]).timestamp()
            for item in status(config)["retrying"]}


def pacs_back_config(tmp_path: Path, model: Path, orthanc, **destination) -> Path:
    """A service delivering to `orthanc` with a long backoff: a report that failed once is
    next tried 600 s later, unless something makes it due sooner."""
    from testbed.real_peers import orthanc_destination

    return write_service_config(
        tmp_path, model=model, destinations=[orthanc_destination(orthanc, **destination)],
        tables={"retry": {"initial_delay_seconds": 600, "max_delay_seconds": 900}})


@pytest.mark.real_peer
def test_a_c_echo_answered_again_makes_the_waiting_reports_due_at_once(tmp_path, tiny_model):
    """Issue 23 item 6: Orthanc back, the C-ECHO saw it, yet the report waited out its
    backoff (up to 15 minutes). Now the first C-ECHO it answers makes it due: the report is
    in Orthanc long before the attempt it was scheduled for."""
    import time

    from testbed.real_peers import Modality, Orthanc

    orthanc = Orthanc(tmp_path / "orthanc", modalities=[Modality("PACS_AI", 104)])  # down
    config = pacs_back_config(tmp_path, tiny_model, orthanc, echo_interval_seconds=10,
                              timeout_seconds=5)
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        send_films(service.port, 1)
        assert wait_until(lambda: waiting_until(config), 60), status(config)
        [scheduled] = waiting_until(config).values()
        assert scheduled > time.time() + 500
        with orthanc:
            assert wait_until(lambda: orthanc.instance_count() == 1, 60), status(config)
            assert time.time() < scheduled - 500
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 30)
            assert service.terminate() == 0
    released = [e for e in service.events() if e["event"] == "deliveries_released"]
    assert [(e["seen"], e["deliveries"]) for e in released] == [("c-echo", 1)], released


@pytest.mark.real_peer
def test_a_report_stored_makes_the_reports_waiting_for_that_pacs_due_at_once(tmp_path,
                                                                             tiny_model):
    """Issue 23 item 6, without C-ECHO: a film sent while Orthanc is down waits 600 s; once
    Orthanc is back, the next film's report is stored at once and takes the waiting one
    with it."""
    import time

    from testbed.real_peers import Modality, Orthanc

    orthanc = Orthanc(tmp_path / "orthanc", modalities=[Modality("PACS_AI", 104)])  # down
    config = pacs_back_config(tmp_path, tiny_model, orthanc, timeout_seconds=5)
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        send_films(service.port, 1, seed=0)
        assert wait_until(lambda: waiting_until(config), 60), status(config)
        [scheduled] = waiting_until(config).values()
        with orthanc:
            send_films(service.port, 1, seed=1)
            assert wait_until(lambda: orthanc.instance_count() == 2, 60), status(config)
            assert time.time() < scheduled - 500
            assert wait_until(lambda: status(config)["jobs"]["done"] == 2, 30)
            assert service.terminate() == 0
    released = [e for e in service.events() if e["event"] == "deliveries_released"]
    assert [(e["seen"], e["deliveries"]) for e in released] == [("delivery", 1)], released
