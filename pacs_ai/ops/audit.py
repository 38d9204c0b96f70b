"""The audit trail: who sent which images, which reports went where, who was refused.

Separate from the operational log (the journal): one JSON object per line in its own file
(`[audit] path`, default `<spool_dir>/audit/audit.log`), rotated by size, for a security
officer or a SIEM. The records follow the DICOM audit message (PS3.15 Annex A.5, after IETF
RFC 3881) where it fits: EventIdentification (EventID, EventActionCode, EventDateTime,
EventOutcomeIndicator, EventOutcomeDescription, EventTypeCode), ActiveParticipant (UserID =
AE title, NetworkAccessPointID, RoleIDCode source/destination), AuditSourceIdentification and
ParticipantObjectIdentification (the study with its SOP class and instance UIDs, the series as a
ParticipantObjectDetail, the Patient ID only with `[audit] include_patient_id`). Coded values
are written as in the standard's schema: {"csd-code", "codeSystemName", "originalText"}. Each
record also carries "pacs_ai": our own short name of the record, the DICOM status and reason,
and the association it belongs to, for grep and jq.

Writing never blocks or breaks the listener: records go through a bounded queue to one writer
thread. A record that cannot be written (a full disk, a queue full because the disk stalls) is
counted (pacs_ai_audit_records_lost_total) and the first loss logged (audit_write_failed);
`audit_write_resumed` says when writing works again and how many were lost.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from pacs_ai.errors import UserError
from pacs_ai.ops import metrics

log = structlog.get_logger()


# --- coded values (DICOM PS3.16 DCM codes, RFC 3881 code 2) -----------------------------------

@dataclass(frozen=True)
class Code:
    code: str
    meaning: str
    scheme: str = "DCM"

    def as_json(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.scheme, "originalText": self.meaning}


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
BEGIN_TRANSFERRING = Code("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "Security Alert")
# Not in DICOM: the end of an association, with what it carried. A locally defined code, as
# PS3.15 allows; the scheme names it as ours.
ASSOCIATION_ENDED = Code("ASSOCIATION-END", "Association Ended", "99PACSAI")

APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")

ROLE_APPLICATION = Code("110150", "Application")
ROLE_DESTINATION = Code("110152", "Destination Role ID")
ROLE_SOURCE = Code("110153", "Source Role ID")

STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")

# EventOutcomeIndicator (RFC 3881 5.1.5)
SUCCESS = 0
MINOR_FAILURE = 4  # failed, and will be tried again (a retry, a modality re-sending)
SERIOUS_FAILURE = 8  # failed for good: refused, given up
MAJOR_FAILURE = 12  # an internal error (a C-STORE answered 0xA700 internal-error)

NETWORK_ACCESS_POINT_MACHINE_NAME = "1"
NETWORK_ACCESS_POINT_IP_ADDRESS = "2"


def _access_point_type(address: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return NETWORK_ACCESS_POINT_MACHINE_NAME
    return NETWORK_ACCESS_POINT_IP_ADDRESS


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a DICOM application entity (or this application) on a node."""

    user_id: str  # the AE title
    address: str | None  # IP address or host name
    requestor: bool
    role: Code
    alternative_user_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"UserID": self.user_id, "UserIsRequestor": self.requestor,
                                  "RoleIDCode": [self.role.as_json()]}
        if self.alternative_user_id:
            record["AlternativeUserID"] = self.alternative_user_id
        if self.address:
            record["NetworkAccessPointID"] = self.address
            record["NetworkAccessPointTypeCode"] = _access_point_type(self.address)
        return record


@dataclass(frozen=True)
class Study:
    """A ParticipantObject of type study: its UID, and the instances of it concerned."""

    study_instance_uid: str | None
    sop_class_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    series_instance_uid: str | None = None

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ParticipantObjectTypeCode": 2,  # system object
            "ParticipantObjectTypeCodeRole": 3,  # report (PS3.15 A.5.3.3 for a study)
            "ParticipantObjectIDTypeCode": STUDY_INSTANCE_UID.as_json(),
            # unknown when a dataset could not be read: the instances are still named
            "ParticipantObjectID": self.study_instance_uid or "",
        }
        if self.sop_class_uid or self.sop_instance_uids:
            record["ParticipantObjectDescription"] = {"SOPClass": [{
                "UID": self.sop_class_uid or "",
                "NumberOfInstances": len(self.sop_instance_uids),
                "Instance": [{"UID": uid} for uid in self.sop_instance_uids]}]}
        if self.series_instance_uid:
            record["ParticipantObjectDetail"] = [{"type": "SeriesInstanceUID",
                                                  "value": self.series_instance_uid}]
        return record


@dataclass(frozen=True)
class Patient:
    """A ParticipantObject of type person/patient: the Patient ID only (never the name)."""

    patient_id: str

    def as_json(self) -> dict[str, Any]:
        return {"ParticipantObjectTypeCode": 1, "ParticipantObjectTypeCodeRole": 1,
                "ParticipantObjectIDTypeCode": PATIENT_NUMBER.as_json(),
                "ParticipantObjectID": self.patient_id}


@dataclass(frozen=True)
class AuditMessage:
    """One audit record. `kind` is our short name of it ("transfer-in", ...); `details` go
    with it under "pacs_ai" (DICOM status, reason, association, destination...)."""

    kind: str
    event_id: Code
    action: str  # EventActionCode: C create, R read, U update, D delete, E execute
    outcome: int
    participants: tuple[Participant, ...]
    event_types: tuple[Code, ...] = ()
    outcome_description: str | None = None
    objects: tuple[Study | Patient, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None  # default: when it is built into JSON

    def as_json(self, source_id: str) -> dict[str, Any]:
        when = (self.at or datetime.now(timezone.utc)).astimezone(timezone.utc)
        event: dict[str, Any] = {
            "EventID": self.event_id.as_json(), "EventActionCode": self.action,
            "EventDateTime": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "EventOutcomeIndicator": self.outcome}
        if self.event_types:
            event["EventTypeCode"] = [code.as_json() for code in self.event_types]
        if self.outcome_description:
            event["EventOutcomeDescription"] = self.outcome_description
        record: dict[str, Any] = {
            "EventIdentification": event,
            "ActiveParticipant": [p.as_json() for p in self.participants],
            "AuditSourceIdentification": {"AuditSourceID": source_id,
                                          "AuditSourceTypeCode": "4"},  # application server
        }
        if self.objects:
            record["ParticipantObjectIdentification"] = [o.as_json() for o in self.objects]
        record["pacs_ai"] = {"record": self.kind, **self.details}
        return record


def new_association_id() -> str:
    """An id that ties together the records of one association."""
    return uuid.uuid4().hex[:16]


def store_outcome(status: int) -> int:
    """EventOutcomeIndicator of a C-STORE answered with `status`: Success and Warnings
    (stored) 0; out of resources (0xA7xx: the sender tries again) 4; other refusals 8."""
    if status == 0x0000 or (status & 0xF000) == 0xB000:
        return SUCCESS
    if (status & 0xFF00) == 0xA700:
        return MINOR_FAILURE
    return SERIOUS_FAILURE


# --- the builders: one per kind of record -----------------------------------------------------

def application_activity(*, started: bool, ae_title: str, node: str,
                         details: dict[str, Any] | None = None) -> AuditMessage:
    """Application Activity (110100): the service started or stopped (PS3.15 A.5.3.1)."""
    return AuditMessage(
        kind="application-start" if started else "application-stop",
        event_id=APPLICATION_ACTIVITY, action="E", outcome=SUCCESS,
        event_types=(APPLICATION_START if started else APPLICATION_STOP,),
        participants=(Participant(ae_title, node, False, ROLE_APPLICATION,
                                  alternative_user_id=f"pacs-ai[{os.getpid()}]"),),
        details=dict(details or {}))


def association_started(*, association_id: str, calling_ae_title: str, peer: str,
                        called_ae_title: str, node: str) -> AuditMessage:
    """Begin Transferring DICOM Instances (110102): a modality's association was accepted."""
    return AuditMessage(
        kind="association-start", event_id=BEGIN_TRANSFERRING, action="E", outcome=SUCCESS,
        participants=(Participant(calling_ae_title, peer, True, ROLE_SOURCE),
                      Participant(called_ae_title, node, False, ROLE_DESTINATION)),
        details={"association": association_id})


def association_ended(*, association_id: str, calling_ae_title: str, peer: str,
                      called_ae_title: str, node: str, how: str, stored: int,
                      refused: int) -> AuditMessage:
    """The association ended: "released" (outcome 0), "aborted" or "closed" without a release
    (4), with how many instances it stored and had refused."""
    return AuditMessage(
        kind="association-end", event_id=ASSOCIATION_ENDED, action="E",
        outcome=SUCCESS if how == "released" else MINOR_FAILURE, outcome_description=how,
        participants=(Participant(calling_ae_title, peer, True, ROLE_SOURCE),
                      Participant(called_ae_title, node, False, ROLE_DESTINATION)),
        details={"association": association_id, "instances_stored": stored,
                 "instances_refused": refused})


def instance_received(*, calling_ae_title: str, peer: str, called_ae_title: str, node: str,
                      status: int, reason: str | None, sop_class_uid: str,
                      sop_instance_uid: str, study_instance_uid: str | None,
                      series_instance_uid: str | None, patient_id: str | None = None,
                      association_id: str | None = None, duplicate: bool = False
                      ) -> AuditMessage:
    """DICOM Instances Transferred (110104), action C: one C-STORE to us and how we answered
    it (PS3.15 A.5.3.3; one record per instance, so each carries its own status)."""
    objects: list[Study | Patient] = [Study(study_instance_uid, sop_class_uid,
                                            (sop_instance_uid,), series_instance_uid)]
    if patient_id:
        objects.append(Patient(patient_id))
    details: dict[str, Any] = {"status": f"0x{status:04X}", "association": association_id}
    if reason:
        details["reason"] = reason
    if duplicate:
        details["duplicate"] = True
    internal = (reason or "").startswith("internal-error")  # a fault of ours, not the data's
    return AuditMessage(
        kind="transfer-in", event_id=INSTANCES_TRANSFERRED, action="C",
        outcome=MAJOR_FAILURE if internal else store_outcome(status),
        outcome_description=f"0x{status:04X}" + (f" {reason}" if reason else ""),
        participants=(Participant(calling_ae_title, peer, True, ROLE_SOURCE),
                      Participant(called_ae_title, node, False, ROLE_DESTINATION)),
        objects=tuple(objects), details=details)


def report_sent(*, calling_ae_title: str, node: str, destination: str,
                destination_ae_title: str, destination_address: str, stored: bool,
                detail: str, given_up: bool, report_uid: str, source_sop_instance_uid: str,
                attempts: int, study_instance_uid: str | None = None,
                sop_class_uid: str | None = None, patient_id: str | None = None,
                object_kind: str = "report") -> AuditMessage:
    """DICOM Instances Transferred (110104), action R: one report (or, `object_kind`
    "heatmap", its heat-map image) sent to a destination and its outcome: stored 0; failed and
    to be retried 4; given up 8."""
    outcome = SUCCESS if stored else SERIOUS_FAILURE if given_up else MINOR_FAILURE
    objects: list[Study | Patient] = [Study(study_instance_uid, sop_class_uid, (report_uid,))]
    if patient_id:
        objects.append(Patient(patient_id))
    details: dict[str, Any] = {"destination": destination, "attempts": attempts,
                               "source_sop_instance_uid": source_sop_instance_uid,
                               "object": object_kind}
    details["status" if stored else "reason"] = detail
    if not stored:
        details["given_up"] = given_up
    return AuditMessage(
        kind="transfer-out", event_id=INSTANCES_TRANSFERRED, action="R", outcome=outcome,
        outcome_description=detail,
        participants=(Participant(calling_ae_title, node, True, ROLE_SOURCE),
                      Participant(destination_ae_title or destination, destination_address,
                                  False, ROLE_DESTINATION)),
        objects=tuple(objects), details=details)


def security_alert(*, reason: str, peer: str, ae_title: str, node: str,
                   calling_ae_title: str | None = None, called_ae_title: str | None = None,
                   detail: str | None = None) -> AuditMessage:
    """Security Alert (110113), Node Authentication (110126), outcome 8: a connection or an
    association refused because the peer is not who may send (unknown calling AE title, wrong
    address, wrong called AE title, failed TLS handshake)."""
    details: dict[str, Any] = {"reason": reason}
    if called_ae_title is not None:
        details["called_ae_title"] = called_ae_title
    return AuditMessage(
        kind="security-alert", event_id=SECURITY_ALERT, action="E", outcome=SERIOUS_FAILURE,
        event_types=(NODE_AUTHENTICATION,),
        outcome_description=reason + (f": {detail}" if detail else ""),
        participants=(Participant(calling_ae_title or "", peer, True, ROLE_SOURCE),
                      Participant(ae_title, node, False, ROLE_DESTINATION)),
        details=details)


# --- the writer ---------------------------------------------------------------------------------

QUEUE_RECORDS = 10_000  # records waiting for the writer; beyond, new ones are lost (counted)
_STOP = object()


def node_name() -> str:
    """This machine as the audit records name it (NetworkAccessPointID of pacs-ai)."""
    return socket.gethostname()


class _RotatingLines(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose write errors are kept for the writer, not printed."""

    def __init__(self, path: Path, max_bytes: int, backup_count: int):
        super().__init__(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8",
                         delay=True)
        self.error: BaseException | None = None

    def _open(self):  # each file, rotated ones too, readable by the service's group only
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=lambda path, flags: os.open(path, flags, 0o640))

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.error = sys.exc_info()[1]
        if self.stream is not None:  # reopened at the next record, which may then fit
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None  # type: ignore[assignment]


class AuditTrail:
    """The audit log file and its writer thread. `record()` never blocks and never raises."""

    def __init__(self, path: Path | None, *, max_bytes: int = 0, backup_count: int = 0,
                 source_id: str = "pacs-ai", queue_records: int = QUEUE_RECORDS):
        self.path = path
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.source_id = source_id
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_records)
        self._handler: _RotatingLines | None = None
        self._thread: threading.Thread | None = None
        self._lost = 0  # records lost since writing last worked
        self._lost_lock = threading.Lock()

    @classmethod
    def disabled(cls) -> "AuditTrail":
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def start(self) -> "AuditTrail":
        """Create the folder and open the file (UserError naming [audit] path if that cannot
        be done), then start the writer."""
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        except OSError as error:
            raise UserError(f"cannot write the audit log {self.path}: "
                            f"{error.strerror or error}; set [audit] path to a writable file "
                            "(or [audit] enabled = false)") from None
        self._handler = _RotatingLines(self.path, self.max_bytes, self.backup_count)
        self._thread = threading.Thread(target=self._write_forever, name="audit-writer",
                                        daemon=True)
        self._thread.start()
        return self

    def record(self, message: AuditMessage) -> None:
        """Queue one record for the file; if it cannot be queued, count it as lost."""
        if self._thread is None:
            return
        try:
            line = _to_line(message.as_json(self.source_id))
            self._queue.put_nowait(line)
        except queue.Full:
            self.lose(OSError("the audit queue is full: the audit log is not being written"))
        except Exception as error:  # a record that cannot be built must not fail the caller
            self.lose(error)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to `timeout` seconds), then close the file."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        thread.join(timeout=timeout)
        if self._handler is not None and not thread.is_alive():
            self._handler.close()

    def _write_forever(self) -> None:
        assert self._handler is not None
        while True:
            line = self._queue.get()
            if line is _STOP:
                return
            self._handler.error = None
            self._handler.emit(logging.makeLogRecord({"msg": line, "args": None}))
            if self._handler.error is not None:
                self.lose(self._handler.error)
            else:
                self._resumed()

    def lose(self, error: BaseException) -> None:
        """Count a record that will not be written (and log the first of an outage); also for
        callers whose record could not even be built."""
        if self.path is None:
            return
        metrics.AUDIT_RECORDS_LOST.inc()
        with self._lost_lock:
            self._lost += 1
            first = self._lost == 1
        if first:  # once per outage, not once per record
            log.warning("audit_write_failed", path=str(self.path), error=str(error))

    def _resumed(self) -> None:
        with self._lost_lock:
            lost, self._lost = self._lost, 0
        if lost:
            log.warning("audit_write_resumed", path=str(self.path), records_lost=lost)


def _to_line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
