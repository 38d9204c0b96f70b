"""An EHR's FHIR endpoint as a destination of `pacs-ai serve` (kind = "fhir"), beside a PACS:
busy and lost answers are retried and leave one DiagnosticReport, a refusal fails at once with
the server's message (without the patient's identifiers) and `pacs-ai retry` sends it again.

The service runs as a subprocess; the EHR is testbed.fhir_peers.RecordingFhirServer (it
validates every resource with fhir.resources R4), the PACS testbed.dicom_peers.RecordingPacs.
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.dicom_peers import (RecordingPacs, ServiceProcess, SimulatedModality, pacs_ai_cli,
                                 synthetic_radiograph, wait_until, write_service_config)
from testbed.fhir_peers import RecordingFhirServer


def status(config: Path) -> dict:
    result = pacs_ai_cli("status", "--config", str(config), "--json", "--limit", "50")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def events(service: ServiceProcess, name: str) -> list[dict]:
    return [e for e in service.events()
            if e["event"] == name and e.get("destination") == "ehr"]


def send(port: int, film) -> None:
    [result] = SimulatedModality(port).send([film])
    assert result.acknowledged, result


def test_busy_and_lost_answers_are_retried_and_leave_one_report(tmp_path, tiny_model):
    film = synthetic_radiograph(seed=41)
    with RecordingPacs() as pacs, RecordingFhirServer(["503", "ok-then-503"]) as ehr:
        config = write_service_config(tmp_path, model=tiny_model,
                                      destinations=[pacs.destination(), ehr.destination()])
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            send(service.port, film)
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            retries = events(service, "delivery_retry_scheduled")
            [delivered] = events(service, "report_delivered")
        assert pacs.wait_for(1, timeout=10)
    assert [e["error"].split(":")[0] for e in retries] == ["http-503", "http-503"]
    assert delivered["attempts"] == 3
    # the lost answer's Bundle was stored; the re-send updated it instead of adding one
    assert delivered["status"] == "HTTP 200 (DiagnosticReport 200 OK)"
    assert [r.action for r in ehr.requests] == ["503", "ok-then-503", "ok"]
    assert all(r.invalid == [] for r in ehr.requests)
    [report] = ehr.resources("DiagnosticReport")
    assert len(ehr.resources("Observation")) == 1 and report.version == 2
    [sr] = pacs.snapshot()
    assert report.resource["identifier"][0]["value"] == f"urn:oid:{sr.SOPInstanceUID}"
    assert report.resource["subject"]["identifier"]["value"] == str(film.PatientID)
    assert report.resource["basedOn"][0]["identifier"]["value"] == str(film.AccessionNumber)


def test_a_refusal_fails_at_once_and_retry_sends_it_again(tmp_path, tiny_model):
    film = synthetic_radiograph(seed=42)
    with RecordingPacs() as pacs, RecordingFhirServer(["400"]) as ehr:
        config = write_service_config(tmp_path, model=tiny_model,
                                      destinations=[pacs.destination(), ehr.destination()])
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            send(service.port, film)
            assert wait_until(lambda: status(config)["jobs"]["failed"] == 1, 60), \
                service.log_path.read_text()[-3000:]
            [failed] = events(service, "delivery_failed")
            assert failed["attempts"] == 1
            assert failed["error"] == \
                f"http-400: Patient <patient data> is not known here ({ehr.url})"
            [failure] = status(config)["failures"]
            assert failure["reason"].startswith("delivery to ehr failed: http-400: ")
            assert pacs_ai_cli("retry", "--config", str(config)).returncode == 0
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, 60)
        assert pacs.wait_for(1, timeout=10)
    assert len(ehr.resources("DiagnosticReport")) == 1
    assert str(film.PatientID) not in (tmp_path / "serve.log").read_text()
