"""What a result message says, read from the report (SR) in the outbox.

The HL7 (pacs_ai.deliver.hl7_message) and FHIR (pacs_ai.deliver.fhir_report) destinations send the same result
the PACS gets as SR, in their own form. Both read it from the SR file, so what they say cannot
differ from the report: the patient and order from the film's header (copied into the SR), the
finding, probability and model from its content tree (pacs_ai.report.report.report_summary). A report
re-read after a restart gives the same facts, so a re-sent message is the same message.

Patient values never go to the log; `identifying_values` lists them so that an error text a
peer echoes back can be cleared of them (`redact`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import DA, TM

from pacs_ai.finding import Finding
from pacs_ai.report.report import report_summary


class ReportUnreadable(ValueError):
    """The report file cannot be read or is not a pacs-ai report; a retry cannot help."""


@dataclass(frozen=True)
class Procedure:
    """A coded procedure: the film's own (Procedure Code Sequence) or the report's."""

    code: str
    scheme: str
    meaning: str


# What the SR reports on when the film names no procedure (pacs_ai.report.report.PLAIN_CHEST_XRAY)
PLAIN_CHEST_XRAY = Procedure("399208008", "SCT", "Plain chest X-ray")


@dataclass(frozen=True)
class PersonName:
    """A DICOM PN's alphabetic group, by component (each "" when absent)."""

    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in (self.family, self.given, self.middle, self.prefix,
                                 self.suffix) if p)


@dataclass(frozen=True)
class ReportFacts:
    report_uid: str  # the SR's SOP Instance UID
    study_instance_uid: str
    source_sop_instance_uid: str  # the film's
    tracking_uid: str  # the finding's Tracking Unique Identifier in the SR
    finding: Finding
    probability: float
    model_name: str
    model_version: str
    algorithm_parameters: tuple[str, ...]  # "threshold=0.84", ...
    software_version: str  # pacs-ai's, as the SR's Software Versions give it
    manufacturer: str
    created: dt.datetime  # the SR's Content Date and Time (local time, with its offset)
    patient_id: str
    issuer_of_patient_id: str
    patient_name: PersonName
    birth_date: dt.date | None
    sex: str  # M, F, O or ""
    accession_number: str
    study_datetime: dt.datetime | None  # with its offset; None without Study Date and Time
    study_date: dt.date | None
    procedure: Procedure

    @property
    def pneumonia(self) -> bool:
        return self.finding == Finding.PNEUMONIA

    def identifying_values(self) -> list[str]:
        """The patient's identifiers and names, longest first (what `redact` removes)."""
        values = {self.patient_id, self.accession_number, *self.patient_name.parts}
        if self.birth_date is not None:
            values |= {self.birth_date.strftime("%Y%m%d"), self.birth_date.isoformat()}
        return sorted((v for v in values if len(v) >= 2), key=len, reverse=True)


def redact(text: str, facts: ReportFacts) -> str:
    """`text` (a peer's error message) without the patient's identifiers and names: a RIS or
    EHR may echo them ("patient 12345 unknown"), and the text goes to the log and the queue."""
    for value in facts.identifying_values():
        text = text.replace(value, "<patient data>")
    return text


def read_report_facts(path: Path) -> ReportFacts:
    """The facts of the report file at `path`; ReportUnreadable when it is not one."""
    try:
        sr = pydicom.dcmread(path)
    except (OSError, InvalidDicomError, AttributeError) as error:
        raise ReportUnreadable(f"report-unreadable: {error}") from None
    return report_facts(sr)


def report_facts(sr: pydicom.Dataset) -> ReportFacts:
    summary = report_summary(sr)
    missing = [key for key in ("finding", "probability", "algorithm_name", "algorithm_version",
                               "source_sop_instance_uid", "tracking_uid")
               if summary.get(key) is None]
    if missing:
        raise ReportUnreadable(f"report-unreadable: not a pacs-ai report (no {', '.join(missing)})")
    software = [str(v) for v in _values(sr.get("SoftwareVersions"))]
    return ReportFacts(
        report_uid=summary["sop_instance_uid"],
        study_instance_uid=summary["study_instance_uid"],
        source_sop_instance_uid=summary["source_sop_instance_uid"],
        tracking_uid=summary["tracking_uid"],
        finding=Finding(summary["finding"]),
        probability=float(summary["probability"]),
        model_name=summary["algorithm_name"],
        model_version=summary["algorithm_version"],
        algorithm_parameters=tuple(summary["algorithm_parameters"]),
        software_version=next((v.split(" ", 1)[1] for v in software
                               if v.startswith("pacs-ai ")), ""),
        manufacturer=_text(sr, "Manufacturer") or "pacs-ai",
        created=_local_datetime(_date(sr, "ContentDate"), _time(sr, "ContentTime"))
        or _local_datetime(dt.date.today(), dt.time()),
        patient_id=_text(sr, "PatientID"),
        issuer_of_patient_id=_text(sr, "IssuerOfPatientID"),
        patient_name=_person_name(sr.get("PatientName")),
        birth_date=_date(sr, "PatientBirthDate"),
        sex=_text(sr, "PatientSex") if _text(sr, "PatientSex") in ("M", "F", "O") else "",
        accession_number=_text(sr, "AccessionNumber"),
        study_datetime=(_local_datetime(_date(sr, "StudyDate"), _time(sr, "StudyTime"))
                        if _time(sr, "StudyTime") is not None else None),
        study_date=_date(sr, "StudyDate"),
        procedure=_procedure(sr),
    )


def _values(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) \
        else [value]


def _text(sr: pydicom.Dataset, keyword: str) -> str:
    return str(sr.get(keyword, "") or "").strip()


def _person_name(value) -> PersonName:
    if not value:
        return PersonName()
    name = pydicom.valuerep.PersonName(value) if not isinstance(
        value, pydicom.valuerep.PersonName) else value
    return PersonName(family=(name.family_name or "").strip(),
                      given=(name.given_name or "").strip(),
                      middle=(name.middle_name or "").strip(),
                      prefix=(name.name_prefix or "").strip(),
                      suffix=(name.name_suffix or "").strip())


def _date(sr: pydicom.Dataset, keyword: str) -> dt.date | None:
    raw = _text(sr, keyword)
    if not raw:
        return None
    try:
        value = DA(raw)
    except ValueError:
        return None
    return dt.date(value.year, value.month, value.day) if value else None


def _time(sr: pydicom.Dataset, keyword: str) -> dt.time | None:
    raw = _text(sr, keyword)
    if not raw:
        return None
    try:
        value = TM(raw)
    except ValueError:
        return None
    # whole seconds: HL7 and FHIR receivers need no more, and it keeps messages short
    return dt.time(value.hour, value.minute, value.second) if value is not None else None


def _local_datetime(date: dt.date | None, time: dt.time | None) -> dt.datetime | None:
    """A DICOM date and time (local, without an offset) with this host's offset at that moment:
    the film's site is the service's (run it in the site's time zone, the TZ variable)."""
    if date is None:
        return None
    return dt.datetime.combine(date, time or dt.time()).astimezone()


def _procedure(sr: pydicom.Dataset) -> Procedure:
    """The film's procedure code (as the RIS ordered it), else the report's Plain chest X-ray."""
    for item in sr.get("ProcedureCodeSequence", []) or []:
        code, scheme = str(item.get("CodeValue", "") or ""), str(
            item.get("CodingSchemeDesignator", "") or "")
        if code and scheme:
            return Procedure(code, scheme, str(item.get("CodeMeaning", "") or ""))
    return PLAIN_CHEST_XRAY
