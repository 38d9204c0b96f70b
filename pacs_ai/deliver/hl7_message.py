"""The HL7 v2.5.1 ORU^R01 result message about one report, and the ACK that answers it, built
and read with `hl7apy` (never by joining strings: every value is escaped by the library).

    MSH  pacs-ai as sending application (MSH-3), the destination's facility and receiver names,
         the report's creation time (MSH-7), control ID derived from the report UID (MSH-10),
         the destination's character set (MSH-18: UNICODE UTF-8, 8859/1 or ASCII)
    SFT  pacs-ai and its version; SFT  the model: its name and version
    PID  the film's Patient ID (with its issuer), name, birth date and sex
    ORC  RE, the film's Accession Number as the filler order number (ORC-3)
    OBR  Accession Number (OBR-3, and OBR-18 where IHE puts it), the procedure (OBR-4: the
         film's Procedure Code, else SCT 399208008 Plain chest X-ray), the study's time (OBR-7),
         the report's time (OBR-22), RAD, result status P (preliminary: not verified), and the
         [report] pneumonia_priority in OBR-27.6 for receivers older than v2.5
    TQ1  the priority (TQ1-9, table 0485), only when the finding is pneumonia
    OBX  the finding (CE: SCT 233604007 Pneumonia or SCT 17621005 Normal), abnormal flag A/N
    OBX  the probability (NM, unit UCUM 1), abnormal flag A/N
    OBX  Algorithm Name, Version and Parameters (DCM 111001, 111003, 111002)
    OBX  the Study Instance UID (DCM 110180), the SR's and the film's SOP Instance UIDs

Every OBX is preliminary (OBX-11 P), like the SR's VerificationFlag UNVERIFIED. The same report
gives the same message, byte for byte: a re-send after a lost ACK or a crash is the message the
RIS has seen, with the same control ID. The bytes are in the character set MSH-18 states
(pacs_ai.deliver.hl7_encoding), which also reads the ACK.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from hl7apy.base_datatypes import ST
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from pacs_ai.config import Hl7Target
from pacs_ai.deliver.hl7_encoding import decode_answer, encode_er7
from pacs_ai.report.report_facts import ReportFacts
from pacs_ai.report.uids import message_control_id

HL7_VERSION = "2.5.1"
SENDING_APPLICATION = "pacs-ai"
# The tolerant level lets real values through that exceed v2.5.1's conformance lengths (a
# 20-character Patient ID in CX.1, which allows 15), as receivers take them; the structure is
# checked by validate() before sending.
_LEVEL = VALIDATION_LEVEL.TOLERANT

FINDING = ("121071", "Finding", "DCM")
PNEUMONIA_CODE = ("233604007", "Pneumonia", "SCT")
NORMAL_CODE = ("17621005", "Normal", "SCT")
PROBABILITY = ("122157", "Probability", "DCM")
NO_UNITS = ("1", "no units", "UCUM")
ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
ALGORITHM_PARAMETERS = ("111002", "Algorithm Parameters", "DCM")
STUDY_INSTANCE_UID = ("110180", "Study Instance UID", "DCM")
# DICOM has no concept for an instance's own UID: local codes (HL7 "99zzz" coding systems)
REPORT_UID = ("SR-UID", "AI result SR SOP Instance UID", "99PACSAI")
FILM_UID = ("FILM-UID", "Source image SOP Instance UID", "99PACSAI")
PRIORITIES = {"S": "Stat", "A": "ASAP"}  # HL7 table 0485, the two [report] offers
ABNORMAL, NORMAL_FLAG = "A", "N"  # OBX-8, HL7 table 0078
PRELIMINARY = "P"  # OBR-25, OBX-11


class MessageNotBuilt(ValueError):
    """A result message cannot be made from this report; str() is the "code: detail"."""


def _escaped(value: str) -> str:
    """`value` as ER7 text: hl7apy escapes the delimiters (| ^ & ~ \\) it contains, so that a
    name like O'Brien^Jr stays one value."""
    return ST(value, validation_level=_LEVEL).to_er7() if value else ""


def _coded(code: tuple[str, str, str]) -> str:
    """A CE/CWE value of three constant parts (code^text^system), none with a delimiter."""
    return "^".join(_escaped(part) for part in code)


def hl7_datetime(value: dt.datetime | dt.date) -> str:
    """DTM: YYYYMMDDHHMMSS+ZZZZ, or YYYYMMDD for a date."""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d%H%M%S%z")
    return value.strftime("%Y%m%d")


def build_oru(facts: ReportFacts, target: Hl7Target, priority: str | None) -> Message:
    """The ORU^R01 for one report. `priority` ("S", "A", or None) is sent only with a finding
    of pneumonia. MessageNotBuilt for a film without an Accession Number (the RIS has no order
    to file the result under) or without a Patient ID."""
    if not facts.accession_number:
        raise MessageNotBuilt(
            "no-accession-number: the film's header has no Accession Number, so the RIS has no "
            "order to file the result under (the report still goes to the other destinations)")
    if not facts.patient_id:
        raise MessageNotBuilt("no-patient-id: the film's header has no Patient ID, so the RIS "
                              "cannot tell whose result it is")
    priority = priority if facts.pneumonia and priority in PRIORITIES else None
    created = hl7_datetime(facts.created)
    message = Message("ORU_R01", version=HL7_VERSION, validation_level=_LEVEL)
    _header(message.msh, facts, target, created)
    for vendor, version, product in (
            (SENDING_APPLICATION, facts.software_version, SENDING_APPLICATION),
            (facts.manufacturer, facts.model_version, facts.model_name)):
        sft = message.add_segment("SFT")
        sft.sft_1.xon_1 = _escaped(vendor)
        sft.sft_2 = _escaped(version or "unknown")
        sft.sft_3 = _escaped(product)
        sft.sft_4 = _escaped(f"{product} {version}".strip())
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _patient(result.add_group("ORU_R01_PATIENT").add_segment("PID"), facts)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"  # observations to follow
    orc.orc_3.ei_1 = _escaped(facts.accession_number)
    _request(order.add_segment("OBR"), facts, created, priority)
    if priority is not None:
        tq1 = order.add_group("ORU_R01_TIMING_QTY").add_segment("TQ1")
        tq1.tq1_1 = "1"
        tq1.tq1_9 = _coded((priority, PRIORITIES[priority], "HL70485"))
    flag = ABNORMAL if facts.pneumonia else NORMAL_FLAG
    observations = [
        ("CE", FINDING, _coded(PNEUMONIA_CODE if facts.pneumonia else NORMAL_CODE), flag, ""),
        ("NM", PROBABILITY, f"{facts.probability:.6f}", flag, _coded(NO_UNITS)),
        ("ST", ALGORITHM_NAME, _escaped(facts.model_name), "", ""),
        ("ST", ALGORITHM_VERSION, _escaped(facts.model_version), "", ""),
        *(("ST", ALGORITHM_PARAMETERS, _escaped(p), "", "") for p in facts.algorithm_parameters),
        ("ST", STUDY_INSTANCE_UID, _escaped(facts.study_instance_uid), "", ""),
        ("ST", REPORT_UID, _escaped(facts.report_uid), "", ""),
        ("ST", FILM_UID, _escaped(facts.source_sop_instance_uid), "", ""),
    ]
    for index, (value_type, code, value, abnormal, units) in enumerate(observations, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        obx.obx_1 = str(index)
        obx.obx_2 = value_type
        obx.obx_3 = _coded(code)
        obx.obx_5 = value
        if units:
            obx.obx_6 = units
        if abnormal:
            obx.obx_8 = abnormal
        obx.obx_11 = PRELIMINARY
        obx.obx_14 = created
    try:
        message.validate()
    except HL7apyException as error:  # a bug here, not in the film: say so plainly
        raise MessageNotBuilt(f"hl7-build-failed: {error}") from None
    return message


def _header(msh, facts: ReportFacts, target: Hl7Target, created: str) -> None:
    msh.msh_3.hd_1 = SENDING_APPLICATION
    if target.sending_facility:
        msh.msh_4.hd_1 = _escaped(target.sending_facility)
    if target.receiving_application:
        msh.msh_5.hd_1 = _escaped(target.receiving_application)
    if target.receiving_facility:
        msh.msh_6.hd_1 = _escaped(target.receiving_facility)
    msh.msh_7 = created
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = message_control_id(facts.report_uid)
    msh.msh_11 = target.processing_id
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = target.msh_18


def _patient(pid, facts: ReportFacts) -> None:
    pid.pid_1 = "1"
    pid.pid_3.cx_1 = _escaped(facts.patient_id)
    if facts.issuer_of_patient_id:
        pid.pid_3.cx_4.hd_1 = _escaped(facts.issuer_of_patient_id)
    name = facts.patient_name
    # DICOM PN is family^given^middle^prefix^suffix; HL7 XPN family^given^middle^suffix^prefix
    for component, value in (("xpn_1", name.family), ("xpn_2", name.given),
                             ("xpn_3", name.middle), ("xpn_4", name.suffix),
                             ("xpn_5", name.prefix)):
        if value:
            setattr(pid.pid_5, component, _escaped(value))
    if facts.birth_date is not None:
        pid.pid_7 = hl7_datetime(facts.birth_date)
    if facts.sex:
        pid.pid_8 = facts.sex


def _request(obr, facts: ReportFacts, created: str, priority: str | None) -> None:
    obr.obr_1 = "1"
    obr.obr_3.ei_1 = _escaped(facts.accession_number)
    procedure = facts.procedure
    obr.obr_4 = _coded((procedure.code, procedure.meaning, procedure.scheme))
    study_time = facts.study_datetime or facts.study_date
    if study_time is not None:
        obr.obr_7 = hl7_datetime(study_time)
    obr.obr_18 = _escaped(facts.accession_number)
    obr.obr_22 = created
    obr.obr_24 = "RAD"
    obr.obr_25 = PRELIMINARY
    if priority is not None:
        obr.obr_27.tq_6 = priority


def oru_bytes(message: Message) -> bytes:
    """The message as sent: ER7 with CR between segments, in the character set its MSH-18
    states; hl7_encoding.NotEncodable when a value does not fit it."""
    return encode_er7(message.to_er7())


# --- the answer -----------------------------------------------------------------------------

ACCEPTED = ("AA", "CA")  # application accept; commit accept (enhanced mode)


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1: AA, AE, AR (or CA, CE, CR)
    control_id: str  # MSA-2: the control ID of the message it answers
    text: str  # MSA-3 and the ERR segments' codes and messages, on one line ("" for none)

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED


class BadAck(ValueError):
    """The answer is not an HL7 ACK; str() is the detail."""


def parse_ack(raw: bytes, charset: str = "UTF-8") -> Ack:
    """The ACK in an answer frame's bytes, in the destination's `charset` (a config
    HL7_CHARSETS key; hl7_encoding.decode_answer when the RIS answers in another)."""
    text = decode_answer(raw, charset)
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    try:
        ack = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT,
                            find_groups=False)
        msa = ack.msa
        code = msa.msa_1.to_er7().strip()
        control_id = msa.msa_2.to_er7().strip()
        details = [msa.msa_3.to_er7().strip()]
        for err in ack.children.get("ERR") or []:
            details += [err.err_3.to_er7().strip(), err.err_8.to_er7().strip(),
                        err.err_1.to_er7().strip()]
    except (HL7apyException, AttributeError, IndexError, TypeError) as error:
        raise BadAck(f"not an HL7 ACK: {type(error).__name__}: {error}") from None
    if not code:
        raise BadAck("not an HL7 ACK: no MSA segment with an acknowledgment code")
    return Ack(code=code.upper(), control_id=control_id,
               text="; ".join(dict.fromkeys(d for d in details if d)))
