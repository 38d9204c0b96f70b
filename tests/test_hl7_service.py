"""A RIS as a destination of `pacs-ai serve` (kind = "hl7"), beside a PACS: each answer the RIS
gives is retried or reported as a C-STORE refusal is (log events, `pacs-ai status`, the audit
trail, the metrics), and a kill -9 while the RIS holds its ACK makes no second message: the
restarted service sends the same message, with the same control ID, and the RIS keeps one.

The service runs as a subprocess; the RIS is testbed.hl7_peers.MllpReceiver (which checks every
message with hl7apy), the PACS testbed.dicom_peers.RecordingPacs.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from pacs_ai.report.report import report_summary
from pacs_ai.report.uids import message_control_id
from testbed.dicom_peers import (LOCALHOST, RecordingPacs, ServiceProcess, SimulatedModality,
                                 free_port, pacs_ai_cli, synthetic_radiograph, wait_until,
                                 write_service_config)
from testbed.hl7_peers import MllpReceiver


def status(config: Path) -> dict:
    result = pacs_ai_cli("status", "--config", str(config), "--json", "--limit", "50")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def send(port: int, *films) -> None:
    results = SimulatedModality(port).send(list(films))
    assert all(r.acknowledged for r in results), results


def events(service: ServiceProcess, name: str, destination: str = "ris") -> list[dict]:
    return [e for e in service.events()
            if e["event"] == name and e.get("destination") == destination]


def audit_records(config: Path, destination: str = "ris") -> list[dict]:
    path = config.parent / "spool" / "audit" / "audit.log"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["pacs_ai"]["record"] == "transfer-out"
            and r["pacs_ai"]["destination"] == destination]


def metric(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=10).read()
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return 0.0


def test_the_ris_gets_one_oru_per_film_beside_the_pacs_and_ae_is_retried(tmp_path, tiny_model):
    film = synthetic_radiograph(seed=31)
    metrics_port = free_port()
    with RecordingPacs() as pacs, MllpReceiver(["AE", "AE"]) as ris:
        config = write_service_config(
            tmp_path, model=tiny_model, destinations=[pacs.destination(), ris.destination()],
            tables={"metrics": {"enabled": True, "host": LOCALHOST, "port": metrics_port}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            send(service.port, film)
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            retries = events(service, "delivery_retry_scheduled")
            [delivered] = events(service, "report_delivered")
            reported = metric(metrics_port, "pacs_ai_reported_total", destination="ris")
        assert pacs.wait_for(1, timeout=10)
    [sr] = pacs.snapshot()
    control_id = message_control_id(str(sr.SOPInstanceUID))
    assert [r.action for r in ris.received] == ["AE", "AE", "AA"]
    # the same message three times, byte for byte; the RIS files it once
    assert {r.raw for r in ris.received} == {ris.received[0].raw}
    assert list(ris.kept()) == [control_id]
    message = ris.kept()[control_id]
    assert message.errors == []
    assert message.field("OBR", 3) == str(film.AccessionNumber)
    assert message.field("PID", 3) == str(film.PatientID)
    finding = report_summary(sr)["finding"]
    assert message.field("OBX", 5) == ("233604007^Pneumonia^SCT" if finding == "pneumonia"
                                       else "17621005^Normal^SCT")
    assert [e["attempts"] for e in retries] == [1, 2]
    assert all(e["error"].startswith("hl7-ae: Order not found") for e in retries), retries
    assert delivered["attempts"] == 3 and delivered["status"] == f"AA (message {control_id})"
    assert reported == 1.0
    # the audit trail: two attempts that will be retried (4), then the delivery (0)
    outcomes = [r["EventIdentification"]["EventOutcomeIndicator"] for r in audit_records(config)]
    assert outcomes == [4, 4, 0]
    [record] = [r for r in audit_records(config) if r["pacs_ai"].get("status")]
    assert record["pacs_ai"]["status"] == f"AA (message {control_id})"
    # no patient data in the log: the RIS messages carry it, the log lines do not
    log = (tmp_path / "serve.log").read_text()
    assert str(film.PatientID) not in log and "Synthetic" not in log


def test_ar_until_the_retries_run_out_fails_the_job_and_retry_sends_it_again(tmp_path,
                                                                           tiny_model):
    film = synthetic_radiograph(seed=32)
    with RecordingPacs() as pacs, MllpReceiver(["AR", "AR"], error_text="Not accepted") as ris:
        config = write_service_config(
            tmp_path, model=tiny_model, destinations=[pacs.destination(), ris.destination()],
            tables={"retry": {"max_attempts": 2}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            send(service.port, film)
            assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            [failed] = events(service, "delivery_failed")
            assert failed["attempts"] == 2 and failed["error"].startswith("hl7-ar: Not accepted")
            report = status(config)
            [failure] = report["failures"]
            assert failure["stage"] == "deliver"
            assert failure["reason"].startswith("delivery to ris failed: hl7-ar: Not accepted")
            assert report["deliveries"]["ris"]["failed"] == 1
            assert pacs.wait_for(1, timeout=10)  # the PACS has its report all the same
            # the RIS answers AA from now on (the script is spent): `pacs-ai retry` delivers it
            assert pacs_ai_cli("retry", "--config", str(config)).returncode == 0
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 60)
    assert [r.action for r in ris.received] == ["AR", "AR", "AA"]
    assert len(ris.kept()) == 1 and len(pacs.snapshot()) == 1
    assert [r["EventIdentification"]["EventOutcomeIndicator"]
            for r in audit_records(config)] == [4, 8, 0]  # retried, given up, delivered


def test_a_film_without_an_accession_number_fails_for_the_ris_only(tmp_path, tiny_model):
    film = synthetic_radiograph(seed=33)
    film.AccessionNumber = ""
    with RecordingPacs() as pacs, MllpReceiver() as ris:
        config = write_service_config(tmp_path, model=tiny_model,
                                      destinations=[pacs.destination(), ris.destination()])
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            send(service.port, film)
            assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 60)
            [failed] = events(service, "delivery_failed")
            assert failed["attempts"] == 1  # given up at once: no retry can find an order
            assert failed["error"].startswith("no-accession-number: ")
        assert pacs.wait_for(1, timeout=10)
    assert ris.received == []


def test_a_latin_1_ris_gets_a_german_name_and_a_cyrillic_one_fails_without_a_trace(tmp_path,
                                                                                tiny_model):
    """charset = "8859/1": Müller reaches the RIS as the bytes it reads (FC for ü); a Cyrillic
    name, which 8859/1 cannot hold, is never sent garbled: its delivery to the RIS fails at
    once, named by field in the log, status and audit trail, the name itself in none of them;
    the PACS gets both reports."""
    german = synthetic_radiograph(seed=35)
    german.SpecificCharacterSet, german.PatientName = "ISO_IR 100", "Müller^Jürgen"
    cyrillic = synthetic_radiograph(seed=36)
    cyrillic.SpecificCharacterSet, cyrillic.PatientName = "ISO_IR 192", "Иванов^Иван"
    metrics_port = free_port()
    with RecordingPacs() as pacs, MllpReceiver() as ris:
        config = write_service_config(
            tmp_path, model=tiny_model,
            destinations=[pacs.destination(), ris.destination(charset="8859/1")],
            tables={"metrics": {"enabled": True, "host": LOCALHOST, "port": metrics_port}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            send(service.port, german, cyrillic)
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1
                              and status(config)["jobs"]["failed"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            [failed] = events(service, "delivery_failed")
            report = status(config)
            status_text = pacs_ai_cli("status", "--config", str(config)).stdout
            failed_metric = metric(metrics_port, "pacs_ai_failed_total", stage="deliver")
        assert pacs.wait_for(2, timeout=10)
    reason = ("hl7-encoding: PID-5 (patient name) has characters outside 8859/1, the "
              "destination's charset: not sent, as the RIS would show them garbled")
    [message] = ris.received  # the German name only
    assert message.errors == [] and message.field("MSH", 18) == "8859/1"
    assert b"|M\xfcller^J\xfcrgen|" in message.raw and message.field("PID", 5) == "Müller^Jürgen"
    assert failed["attempts"] == 1 and failed["error"] == reason  # not retried
    assert failed["sop_instance_uid"] == str(cyrillic.SOPInstanceUID)
    [failure] = report["failures"]
    assert failure["stage"] == "deliver"
    assert failure["reason"] == f"delivery to ris failed: {reason}"
    assert report["deliveries"]["ris"]["failed"] == 1 and failed_metric == 1.0
    outcomes = {r["pacs_ai"]["source_sop_instance_uid"]:
                (r["EventIdentification"]["EventOutcomeIndicator"], r["pacs_ai"].get("reason"))
                for r in audit_records(config)}
    assert outcomes == {str(german.SOPInstanceUID): (0, None),  # delivered
                        str(cyrillic.SOPInstanceUID): (8, reason)}  # given up at once
    audit = (tmp_path / "spool" / "audit" / "audit.log").read_text()
    assert reason in audit
    log = (tmp_path / "serve.log").read_text()
    for text in (log, audit, json.dumps(report), status_text):
        for part in ("Иванов", "Иван", "Müller", "Jürgen"):
            assert part not in text and json.dumps(part)[1:-1] not in text, part


@pytest.mark.slow
def test_kill_9_while_the_ris_holds_its_ack_sends_the_same_message_again(tmp_path, tiny_model):
    """The RIS has the message but its ACK has not come when the service dies: the restarted
    service sends the same bytes with the same control ID, and the RIS files one message."""
    film = synthetic_radiograph(seed=34)
    with RecordingPacs() as pacs, MllpReceiver(["none"]) as ris:
        config = write_service_config(
            tmp_path, model=tiny_model,
            destinations=[pacs.destination(), ris.destination(timeout_seconds=120)])
        log_path = tmp_path / "serve.log"
        service = ServiceProcess(config, log_path).start()
        try:
            send(service.port, film)
            assert ris.wait_for(1, timeout=60), log_path.read_text()[-3000:]
            assert pacs.wait_for(1, timeout=30)
        finally:
            service.kill()  # the RIS is holding the ACK of the only message
        assert [r.action for r in ris.received] == ["none"]
        with ServiceProcess(config, log_path) as restarted:
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 60), \
                log_path.read_text()[-3000:]
            assert restarted.terminate() == 0
    first, again = ris.received
    assert again.action == "AA" and again.raw == first.raw
    assert again.control_id == message_control_id(str(pacs.snapshot()[0].SOPInstanceUID))
    assert list(ris.kept()) == [again.control_id]
    assert len(pacs.snapshot()) == 1
