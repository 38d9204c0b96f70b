"""A film from DCMTK's storescu reaches, through `pacs-ai serve` with the shipped model, the PACS
(Orthanc: the SR and the heat-map image), the RIS (one HL7 ORU^R01 with its accession number
and coded finding) and the EHR (one valid FHIR DiagnosticReport with its Observation), and a
kill -9 while the RIS and the EHR hold their answers makes no second message or report: the
restarted service sends the same message (same control ID) and the same Bundle (a conditional
update of the report it made), and the PACS gets nothing again.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest

from pacs_ai.config import default_model_path
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.site_threshold import binding_keys
from pacs_ai.report.report import report_summary
from pacs_ai.report.uids import message_control_id
from testbed.dicom_peers import ServiceProcess, pacs_ai_cli, wait_until, write_service_config
from testbed.environment import SAMPLE_DICOMS, require_tool
from testbed.fhir_peers import RecordingFhirServer
from testbed.hl7_peers import MllpReceiver
from testbed.real_peers import Modality, Orthanc, orthanc_destination, renamed_copy, storescu

pytestmark = [pytest.mark.real_peer, pytest.mark.slow]

PNEUMONIA_SAMPLE = SAMPLE_DICOMS / "cr_pneumonia_pa_12bit_mono1.dcm"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
TIMEOUT_S = 120
# every film is classified (the copies' synthetic UIDs carry the samples' ages); as in
# test_heatmap_peers (1.0: the gate never abstains, bound to the shipped file below)
OPEN_MODEL = {"min_age_years": 0, "max_age_years": 150, "ood_threshold": 1.0}


def status(config: Path) -> dict:
    result = pacs_ai_cli("status", "--config", str(config), "--json", "--limit", "50")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_storescu_to_pacs_ris_and_ehr_through_a_kill_9(tmp_path):
    require_tool("Orthanc")
    film = renamed_copy(PNEUMONIA_SAMPLE, tmp_path / "film.dcm")
    source = pydicom.dcmread(film, stop_before_pixels=True)
    study = str(source.StudyInstanceUID)
    (tmp_path / "service").mkdir()
    with Orthanc(tmp_path / "orthanc", modalities=[Modality("PACS_AI", 104)]) as orthanc, \
            MllpReceiver(["none"]) as ris, RecordingFhirServer(["hold"]) as ehr:
        config = write_service_config(
            tmp_path / "service",
            model=default_model_path(),
            destinations=[orthanc_destination(orthanc),
                          ris.destination(timeout_seconds=TIMEOUT_S),
                          ehr.destination(timeout_seconds=TIMEOUT_S,
                                          patient_id_system="urn:oid:1.2.3.4.5")],
            tables={"workers": {"torch_threads": 1},
                    "model": {**OPEN_MODEL, **binding_keys(PneumoniaModel.load(
                        default_model_path()))},
                    "report": {"pneumonia_priority": "S"}})
        log = tmp_path / "service" / "serve.log"

        # 1. the PACS stores both objects; the RIS and the EHR hold their answers: kill -9
        service = ServiceProcess(config, log).start()
        try:
            sent = storescu(service.port, [film], called_ae="PACS_AI", calling_ae="XRAY_ROOM_1")
            assert sent.acknowledged == [str(film)], sent.output
            assert wait_until(lambda: len(orthanc.study_instances(study)) == 2, TIMEOUT_S), \
                log.read_text()[-3000:]  # the SR and the heat-map image
            assert ris.wait_for(1, TIMEOUT_S) and ehr.wait_for(1, TIMEOUT_S)
            assert status(config)["jobs"]["delivering"] == 1
        finally:
            service.kill()
        assert [r.action for r in ris.received] == ["none"]
        assert ehr.resources("DiagnosticReport") != []  # stored; its answer never came

        # 2. restarted: the same message and Bundle go again; the PACS gets nothing new
        with ServiceProcess(config, log) as restarted:
            assert wait_until(lambda: status(config)["jobs"]["done"] == 1, TIMEOUT_S), \
                log.read_text()[-3000:]
            report = status(config)
            assert restarted.terminate() == 0
        objects = orthanc.study_instances(study)
        # the PACS: one SR (pneumonia, with its region) and one heat-map image
        sr_uids = [o["SOPInstanceUID"] for o in objects if o.get("Modality") == "SR"]
        images = [o for o in objects if o.get("SOPClassUID") == SECONDARY_CAPTURE]
        assert len(sr_uids) == 1 and len(images) == 1, objects
        sr = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc.find_instance(
            sr_uids[0]))))
    summary = report_summary(sr)
    assert summary["finding"] == "pneumonia" and summary["region"] is not None
    # the heat-map image went to the PACS only: the RIS and the EHR had one delivery each
    assert set(report["heatmap_deliveries"]) == {"orthanc"}, report["heatmap_deliveries"]
    assert report["deliveries"]["ris"]["done"] == report["deliveries"]["ehr"]["done"] == 1

    # the RIS: the same message twice (sent, then re-sent after the kill), filed once
    first, again = ris.received
    assert again.action == "AA" and again.raw == first.raw and again.errors == []
    assert list(ris.kept()) == [message_control_id(sr_uids[0])]
    assert again.field("ORC", 3) == again.field("OBR", 3) == "ZZACC00006"
    assert again.field("PID", 3) == "PACSAI-FAKE-0006"
    assert again.field("OBX", 5) == "233604007^Pneumonia^SCT" and again.field("OBX", 8) == "A"
    assert again.field("TQ1", 9) == "S^Stat^HL70485"
    assert float(again.field("OBX", 5, index=1)) == pytest.approx(summary["probability"],
                                                                 abs=1e-6)

    # the EHR: two valid Bundles, the second an update of what the first created
    assert [r.action for r in ehr.requests] == ["hold", "ok"]
    assert all(r.invalid == [] for r in ehr.requests)
    assert [r.statuses for r in ehr.requests] == [["201 Created", "201 Created"],
                                                  ["200 OK", "200 OK"]]
    [diagnostic] = ehr.resources("DiagnosticReport")
    [observation] = ehr.resources("Observation")
    resource = diagnostic.resource
    assert resource["identifier"][0]["value"] == f"urn:oid:{sr_uids[0]}"
    assert resource["status"] == "preliminary"
    assert resource["conclusionCode"][0]["coding"][0]["code"] == "233604007"
    assert resource["subject"]["identifier"] == {"system": "urn:oid:1.2.3.4.5",
                                                 "value": "PACSAI-FAKE-0006"}
    assert resource["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
    assert resource["basedOn"][0]["identifier"]["value"] == "ZZACC00006"
    assert resource["result"] == [{"reference": f"Observation/{observation.id}"}]
    assert resource["meta"]["tag"][0]["code"] == "S"
    assert observation.resource["valueQuantity"]["value"] == pytest.approx(
        summary["probability"], abs=1e-6)

    # no patient data in the service's log
    text = log.read_text()
    assert "PACSAI-FAKE-0006" not in text and "SAMPLE06" not in text
