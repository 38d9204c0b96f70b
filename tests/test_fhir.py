"""FHIR R4 to an EHR (kind = "fhir"): the transaction Bundle made from a report, validated with
`fhir.resources` (R4 4.0.1), and the transport against testbed.fhir_peers.RecordingFhirServer,
a FHIR endpoint that validates every resource and does conditional updates as R4 says (no real
FHIR server runs here). The service paths are in test_results_end_to_end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import requests

from pacs_ai.config import ConfigError, Destination, FhirTarget, ReportConfig, parse_config
from pacs_ai.deliver.fhir_report import BundleNotBuilt, report_bundle
from pacs_ai.deliver.fhir_transport import FhirTransport
from pacs_ai.model.model import ModelInfo
from pacs_ai.report.report import build_report
from pacs_ai.report.report_facts import read_report_facts
from testbed.dicom_peers import synthetic_radiograph
from testbed.fhir_peers import RecordingFhirServer, validate_bundle

MODEL = ModelInfo(name="pacs-ai-pneumonia", version="1.4.2", threshold=0.42,
                  output_kind="logit", metadata={})
MRN = "https://hospital.example.org/mrn"
TARGET = FhirTarget(url="http://unused", patient_id_system=MRN)


def report_path(folder: Path, probability: float, seed: int = 1, **header) -> Path:
    source = synthetic_radiograph(seed=seed)
    for keyword, value in header.items():
        setattr(source, keyword, value)
    report = build_report(source, probability, MODEL)
    path = folder / f"{report.SOPInstanceUID}.dcm"
    report.save_as(path, enforce_file_format=True)
    return path


def entries(bundle: dict) -> tuple[dict, dict]:
    observation, report = (entry["resource"] for entry in bundle["entry"])
    return observation, report


# --- the Bundle ------------------------------------------------------------------------------

def test_a_pneumonia_report_is_a_valid_r4_diagnostic_report_with_its_observation(tmp_path):
    path = report_path(tmp_path, 0.87)
    sr = pydicom.dcmread(path)
    bundle = report_bundle(read_report_facts(path), TARGET, "S")
    assert validate_bundle(bundle) == []
    observation, report = entries(bundle)
    patient = {"type": "Patient", "identifier": {"system": MRN, "value": str(sr.PatientID)}}
    study = {"type": "ImagingStudy", "identifier": {
        "system": "urn:dicom:uid", "value": f"urn:oid:{sr.StudyInstanceUID}"}}
    assert report["status"] == observation["status"] == "preliminary"
    assert report["subject"] == observation["subject"] == patient
    assert report["imagingStudy"] == [study] and observation["derivedFrom"] == [study]
    assert report["identifier"] == [{"system": "urn:dicom:uid",
                                     "value": f"urn:oid:{sr.SOPInstanceUID}"}]
    assert report["conclusionCode"][0]["coding"][0] == {
        "system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}
    [order] = report["basedOn"]
    assert order["identifier"]["value"] == str(sr.AccessionNumber)
    assert order["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    assert report["result"] == [{"reference": bundle["entry"][0]["fullUrl"]}]
    assert report["effectiveDateTime"].startswith("2024-01-02T10:15:00")
    assert report["meta"]["tag"][0]["code"] == "S"
    assert observation["valueQuantity"] == {"value": 0.87, "unit": "1",
                                            "system": "http://unitsofmeasure.org", "code": "1"}
    assert observation["interpretation"][0]["coding"][0]["code"] == "A"
    [device] = observation["contained"]
    assert device["deviceName"][0]["name"] == "pacs-ai-pneumonia"
    assert device["version"] == [{"value": "1.4.2"}] and observation["device"]["reference"] == \
        "#model"
    assert "threshold=0.42" in observation["method"]["text"]
    # each entry a conditional update on its identifier: a re-send updates, never adds
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "PUT", "url": "Observation?identifier=urn%3Adicom%3Auid%7Curn%3Aoid%3A"
                                 + report_tracking_uid(sr)},
        {"method": "PUT", "url": "DiagnosticReport?identifier=urn%3Adicom%3Auid%7Curn%3Aoid%3A"
                                 + str(sr.SOPInstanceUID)}]


def report_tracking_uid(sr) -> str:
    from pacs_ai.report.report import report_summary
    return report_summary(sr)["tracking_uid"]


def test_a_normal_report_is_normal_without_a_priority(tmp_path):
    bundle = report_bundle(read_report_facts(report_path(tmp_path, 0.1, seed=2)), TARGET, "S")
    assert validate_bundle(bundle) == []
    observation, report = entries(bundle)
    assert report["conclusionCode"][0]["coding"][0]["code"] == "17621005"
    assert "meta" not in report
    assert observation["interpretation"][0]["coding"][0]["code"] == "N"


def test_the_same_report_gives_the_same_bundle(tmp_path):
    path = report_path(tmp_path, 0.5, seed=3)
    assert report_bundle(read_report_facts(path), TARGET, "A") == \
        report_bundle(read_report_facts(path), TARGET, "A")


def test_without_an_accession_number_the_report_names_no_order(tmp_path):
    bundle = report_bundle(read_report_facts(report_path(tmp_path, 0.5, seed=4,
                                                         AccessionNumber="")), TARGET, None)
    assert validate_bundle(bundle) == []
    assert "basedOn" not in entries(bundle)[1]


def test_without_a_patient_id_no_bundle_is_made(tmp_path):
    with pytest.raises(BundleNotBuilt, match="^no-patient-id: "):
        report_bundle(read_report_facts(report_path(tmp_path, 0.5, seed=5, PatientID="")),
                      TARGET, None)


def test_the_validator_refuses_what_r4_does_not_allow(tmp_path):
    """The test server's check is not a formality: a value of the wrong type, an element R4
    does not have, a status outside its value set, a time without its offset and a contained
    reference to nothing are each named."""
    bundle = report_bundle(read_report_facts(report_path(tmp_path, 0.5, seed=6)), TARGET, None)
    observation, report = entries(bundle)
    observation["valueQuantity"]["value"] = "high"
    report["priority"] = "stat"  # R4's DiagnosticReport has none (hence the meta.tag)
    problems = " | ".join(validate_bundle(bundle))
    assert "valueQuantity.value" in problems and "priority" in problems, problems
    bundle = report_bundle(read_report_facts(report_path(tmp_path, 0.5, seed=6)), TARGET, None)
    observation, report = entries(bundle)
    report["status"] = "probable"
    report["effectiveDateTime"] = "2024-01-02T10:15:00"
    observation["device"]["reference"] = "#nothing"
    assert validate_bundle(bundle) == [
        "entry.0.resource: #nothing names no contained resource",
        "entry.1.resource.status: 'probable' is not in the required value set",
        "entry.1.resource.effectiveDateTime: a time without its offset"]


# --- the config ------------------------------------------------------------------------------

def test_a_fhir_destination_is_read(tmp_path):
    (tmp_path / "token").write_text("t0ken\n")
    config = parse_config({"destinations": [
        {"kind": "fhir", "name": "ehr", "url": "https://ehr.example.org/fhir/r4/",
         "auth": "bearer", "token_file": "token", "patient_id_system": "urn:oid:1.2.3.4"}]},
        base_dir=tmp_path)
    [ehr] = config.destinations
    assert ehr.kind == "fhir" and not ehr.takes_images
    assert ehr.fhir == FhirTarget(url="https://ehr.example.org/fhir/r4", auth="bearer",
                                  token_file=tmp_path / "token",
                                  patient_id_system="urn:oid:1.2.3.4")


@pytest.mark.parametrize("entry,message", [
    ({"kind": "fhir"}, '[[destinations]] #1 url: is required for kind = "fhir": the FHIR base'),
    ({"kind": "fhir", "url": "http://x/fhir", "patient_id_system": "my mrn"},
     "[[destinations]] #1 patient_id_system: expected a URI without spaces"),
    ({"kind": "fhir", "url": "http://x/fhir", "host": "x"},
     '[[destinations]] #1 host: is for C-STORE destinations; a kind = "fhir" destination'),
    ({"kind": "dicomweb", "url": "http://x/dw", "patient_id_system": "urn:oid:1"},
     "[[destinations]] #1: unknown key 'patient_id_system'"),
])
def test_fhir_mistakes_name_the_key(tmp_path, entry, message):
    with pytest.raises(ConfigError) as error:
        parse_config({"destinations": [entry]}, base_dir=tmp_path)
    assert str(error.value).startswith(message), str(error.value)


# --- the transport against the recording FHIR server ----------------------------------------

def transport(url: str, **target) -> FhirTransport:
    return FhirTransport(Destination(name="ehr", ae_title="", host="", port=0,
                                     timeout_seconds=target.pop("timeout_seconds", 5),
                                     fhir=FhirTarget(url=url, patient_id_system=MRN, **target)),
                         ReportConfig())


def test_a_re_send_updates_the_one_report_it_made(tmp_path):
    path = report_path(tmp_path, 0.9, seed=10)
    with RecordingFhirServer() as ehr:
        connection = transport(ehr.url).connect()
        first, again = connection.store(path), connection.store(path)
    assert first.stored and first.detail == "HTTP 200 (DiagnosticReport 201 Created)"
    assert again.stored and again.detail == "HTTP 200 (DiagnosticReport 200 OK)"
    [report], [observation] = ehr.resources("DiagnosticReport"), ehr.resources("Observation")
    assert report.version == observation.version == 2
    assert report.resource["result"] == [{"reference": f"Observation/{observation.id}"}]
    assert all(r.invalid == [] for r in ehr.requests)


def test_server_answers_become_outcomes(tmp_path):
    path = report_path(tmp_path, 0.9, seed=11)
    patient = read_report_facts(path).patient_id
    with RecordingFhirServer(["503", "400"]) as ehr:
        connection = transport(ehr.url).connect()
        busy, refused = connection.store(path), connection.store(path)
    assert not busy.stored and not busy.permanent
    assert busy.detail == f"http-503: busy, try later ({ehr.url})"
    assert not refused.stored and refused.permanent  # the same Bundle would be refused again
    assert refused.detail == f"http-400: Patient <patient data> is not known here ({ehr.url})"
    assert patient not in refused.detail


def test_two_reports_matching_one_identifier_fail_at_once(tmp_path):
    path = report_path(tmp_path, 0.9, seed=12)
    with RecordingFhirServer() as ehr:
        connection = transport(ehr.url).connect()
        assert connection.store(path).stored
        # the EHR holds a second DiagnosticReport with the same identifier
        [report] = ehr.resources("DiagnosticReport")
        from testbed.fhir_peers import Stored
        ehr.stored[("DiagnosticReport", "copy")] = Stored("DiagnosticReport", "copy", 1,
                                                         dict(report.resource, id="copy"))
        result = connection.store(path)
    assert not result.stored and result.permanent
    assert result.detail.startswith("http-412: 2 DiagnosticReport match urn:oid:")


def test_basic_auth_and_a_wrong_password(tmp_path):
    path = report_path(tmp_path, 0.9, seed=13)
    (tmp_path / "right").write_text("s3cret\n")
    (tmp_path / "wrong").write_text("guess\n")
    with RecordingFhirServer(credentials=("pacs-ai", "s3cret")) as ehr:
        right = transport(ehr.url, auth="basic", username="pacs-ai",
                          password_file=tmp_path / "right").connect().store(path)
        wrong = transport(ehr.url, auth="basic", username="pacs-ai",
                          password_file=tmp_path / "wrong").connect().store(path)
    assert right.stored
    assert not wrong.stored and not wrong.permanent  # a password the admin can fix: retried
    assert wrong.detail.startswith("http-401: authentication required")


def test_https_with_the_ehr_s_ca_and_a_bearer_token(tmp_path):
    from tests.tls_material import make_tls_material

    material = make_tls_material(tmp_path / "tls")
    stranger = make_tls_material(tmp_path / "tls", prefix="stranger-")
    (tmp_path / "token").write_text("opaque-token\n")
    path = report_path(tmp_path, 0.9, seed=14)
    with RecordingFhirServer(credentials="opaque-token", tls=material) as ehr:
        trusted = transport(ehr.url, auth="bearer", token_file=tmp_path / "token",
                            ca_file=material.ca_cert).connect()
        assert trusted.store(path).stored
        untrusted = transport(ehr.url, auth="bearer", token_file=tmp_path / "token",
                              ca_file=stranger.ca_cert).connect()
        result = untrusted.store(path)
    assert result.detail.startswith("tls-certificate: ") and not untrusted.is_open()
    assert [r.authorization for r in ehr.requests] == ["Bearer opaque-token"]


def test_no_server_is_a_connection_failure(tmp_path):
    from testbed.dicom_peers import free_port

    url = f"http://127.0.0.1:{free_port()}/fhir"
    connection = transport(url).connect()
    result = connection.store(report_path(tmp_path, 0.9, seed=15))
    assert result.detail.startswith(f"connection-failed: {url}: ") and not connection.is_open()


def test_the_server_refuses_an_invalid_bundle(tmp_path):
    """What pacs-ai sends passes the server's validation; a broken Bundle does not."""
    bundle = report_bundle(read_report_facts(report_path(tmp_path, 0.9, seed=16)), TARGET, None)
    bundle["entry"][1]["resource"]["status"] = "probable"
    with RecordingFhirServer() as ehr:
        answer = requests.post(ehr.url, data=json.dumps(bundle),
                               headers={"Content-Type": "application/fhir+json"}, timeout=10)
    assert answer.status_code == 400 and "status" in answer.json()["issue"][0]["diagnostics"]
    assert ehr.resources("DiagnosticReport") == [] and ehr.requests[0].invalid
