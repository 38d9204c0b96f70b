"""The FHIR R4 form of one report: a DiagnosticReport and an Observation, in one transaction
Bundle that updates both by their identifiers (conditional update), so a Bundle sent twice
leaves one of each.

    Observation       the probability (DCM 122157, valueQuantity in UCUM "1"), interpretation
                      A (pneumonia) or N, status preliminary; the model as a contained Device
                      (name, version, manufacturer), the threshold in `method`; identifier: the
                      SR's Tracking Unique Identifier of the finding
    DiagnosticReport  status preliminary, category RAD, the procedure (the film's Procedure
                      Code where FHIR knows its system, else SCT 399208008 Plain chest X-ray),
                      conclusionCode SCT 233604007 Pneumonia or SCT 17621005 Normal, the result
                      above; identifier: the SR's SOP Instance UID
    both              the patient by identifier (the film's Patient ID, in [[destinations]]
                      patient_id_system when set), the study by its Study Instance UID
                      (ImagingStudy identifier), the order by the Accession Number (basedOn a
                      ServiceRequest with an ACSN identifier), the film's time as effective
    priority          on a pneumonia report only, a meta.tag in v3-ActPriority (S stat, A ASAP):
                      R4's DiagnosticReport has no priority element

DICOM UIDs are identifiers in the system urn:dicom:uid with the value urn:oid:<uid>, as FHIR's
ImagingStudy has them. The same report gives the same Bundle.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from pacs_ai.config import FhirTarget
from pacs_ai.report.report_facts import ReportFacts
from pacs_ai.report.uids import result_resource_uuid

DICOM_UID = "urn:dicom:uid"
SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
# DICOM coding scheme designators (PS3.16 8) -> FHIR code system URIs
CODE_SYSTEMS = {"SCT": SNOMED, "SRT": SNOMED, "LN": "http://loinc.org", "DCM": DCM,
                "RADLEX": "http://radlex.org", "RADLEX_PLAYBOOK": "http://radlex.org",
                "UCUM": UCUM}
PRIORITIES = {"S": "stat", "A": "ASAP"}  # v3-ActPriority codes and their displays


class BundleNotBuilt(ValueError):
    """A FHIR result cannot be made from this report; str() is the "code: detail"."""


def uid_identifier(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID, "value": f"urn:oid:{uid}"}


def conditional_url(resource_type: str, identifier: dict[str, str]) -> str:
    """`Type?identifier=system|value`, the search a conditional update matches on."""
    return f"{resource_type}?" + urlencode(
        {"identifier": f"{identifier['system']}|{identifier['value']}"})


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def report_bundle(facts: ReportFacts, target: FhirTarget, priority: str | None) -> dict[str, Any]:
    """The transaction Bundle for one report (JSON-ready). `priority` ("S", "A" or None) is
    tagged on a pneumonia report only."""
    if not facts.patient_id:
        raise BundleNotBuilt("no-patient-id: the film's header has no Patient ID, so the EHR "
                             "cannot tell whose result it is")
    patient = {"type": "Patient", "identifier": {"value": facts.patient_id}}
    if target.patient_id_system:
        patient["identifier"]["system"] = target.patient_id_system
    study = {"type": "ImagingStudy", "identifier": uid_identifier(facts.study_instance_uid)}
    observation_id = uid_identifier(facts.tracking_uid)
    report_id = uid_identifier(facts.report_uid)
    observation_url = result_resource_uuid("Observation", facts.tracking_uid)
    report_url = result_resource_uuid("DiagnosticReport", facts.report_uid)
    model = f"{facts.model_name} {facts.model_version}"
    effective = _effective(facts)
    issued = facts.created.isoformat(timespec="seconds")

    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "contained": [{
            "resourceType": "Device", "id": "model", "manufacturer": facts.manufacturer,
            "deviceName": [{"name": facts.model_name, "type": "model-name"}],
            "version": [{"value": facts.model_version}]}],
        "identifier": [observation_id],
        "status": "preliminary",
        "category": [_coding("http://terminology.hl7.org/CodeSystem/observation-category",
                             "imaging", "Imaging")],
        "code": {**_coding(DCM, "122157", "Probability"),
                 "text": "Probability of pneumonia (AI, not verified)"},
        "subject": patient,
        **effective,
        "issued": issued,
        "valueQuantity": {"value": round(facts.probability, 6), "unit": "1", "system": UCUM,
                          "code": "1"},
        "interpretation": [_coding(
            "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            *(("A", "Abnormal") if facts.pneumonia else ("N", "Normal")))],
        "method": {"text": "; ".join((model, *facts.algorithm_parameters))},
        "device": {"reference": "#model", "display": model},
        "derivedFrom": [study],
    }
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [report_id],
        "status": "preliminary",
        "category": [_coding("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD",
                             "Radiology")],
        "code": _procedure(facts),
        "subject": patient,
        **effective,
        "issued": issued,
        "imagingStudy": [study],
        "result": [{"reference": observation_url}],
        "conclusion": (f"{'Pneumonia' if facts.pneumonia else 'No pneumonia found'} "
                       f"(probability {facts.probability:.3f}; {model}; AI result, not "
                       "verified)"),
        "conclusionCode": [_coding(SNOMED, "233604007", "Pneumonia") if facts.pneumonia
                           else _coding(SNOMED, "17621005", "Normal")],
    }
    if facts.accession_number:
        order = {"type": "ServiceRequest", "identifier": {
            "type": _coding("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN",
                            "Accession ID"),
            "value": facts.accession_number}}
        report["basedOn"] = [order]
        observation["basedOn"] = [order]
    if facts.pneumonia and priority in PRIORITIES:
        report["meta"] = {"tag": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActPriority",
            "code": priority, "display": PRIORITIES[priority]}]}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": observation_url, "resource": observation,
         "request": {"method": "PUT", "url": conditional_url("Observation", observation_id)}},
        {"fullUrl": report_url, "resource": report,
         "request": {"method": "PUT", "url": conditional_url("DiagnosticReport", report_id)}},
    ]}


def _effective(facts: ReportFacts) -> dict[str, str]:
    """effectiveDateTime: the film's Study Date and Time (a date alone without a time)."""
    if facts.study_datetime is not None:
        return {"effectiveDateTime": facts.study_datetime.isoformat(timespec="seconds")}
    if facts.study_date is not None:
        return {"effectiveDateTime": facts.study_date.isoformat()}
    return {}


def _procedure(facts: ReportFacts) -> dict[str, Any]:
    procedure = facts.procedure
    system = CODE_SYSTEMS.get(procedure.scheme.upper())
    if system is None:  # a local scheme FHIR has no system for: the report's own procedure
        concept = _coding(SNOMED, "399208008", "Plain chest X-ray")
        concept["text"] = procedure.meaning or procedure.code
        return concept
    return {**_coding(system, procedure.code, procedure.meaning or procedure.code),
            "text": procedure.meaning or procedure.code}
