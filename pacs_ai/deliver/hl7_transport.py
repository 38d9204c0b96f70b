"""HL7 v2 over MLLP as a destination's transport (kind = "hl7"): the RIS gets one ORU^R01 per
report (pacs_ai.deliver.hl7_message), made from the SR in the outbox, and answers each with an ACK.

    AA (or CA)                 delivered ("AA", with the message control ID)
    AE, AR (or CE, CR)         hl7-ae / hl7-ar: the RIS's text and error codes, retried with
                               the [retry] backoff like a refused C-STORE, failed when it runs out
    no ACK within the timeout, no-answer: the connection is closed (a late ACK must not be
    the connection closed       taken for the next message's); the rest of the batch fails
                               with it, retried
    an ACK for another message, hl7-bad-ack, retried
    or not an ACK
    no connection, TLS         connection-failed / tls-..., retried
    a film without an          no-accession-number, given up at once (the RIS has no order to
    Accession Number           file it under; the other destinations still get the report)
    a value the destination's  hl7-encoding: the fields named, not their values; given up at
    charset cannot represent   once (a retry sends the same name: it would fail the same way)

A re-sent message (after a lost ACK, or a kill between the ACK and its record) has the same
control ID (MSH-10, from the report UID): the RIS knows it as the message it has seen. The
text a RIS answers with is cleared of the patient's identifiers before it is recorded
(report_facts.redact).
"""

from __future__ import annotations

from pathlib import Path

from pacs_ai.config import Destination, ReportConfig
from pacs_ai.deliver.cstore_transport import client_ssl_context
from pacs_ai.deliver.hl7_encoding import NotEncodable
from pacs_ai.deliver.hl7_message import BadAck, MessageNotBuilt, build_oru, oru_bytes, parse_ack
from pacs_ai.deliver.mllp import MllpClient, MllpError, NoAnswer
from pacs_ai.deliver.transport import ConnectFailed, StoreResult
from pacs_ai.report.report_facts import ReportUnreadable, read_report_facts, redact
from pacs_ai.report.uids import message_control_id

ANSWER_CHARS = 300  # of the RIS's text kept in the error


class Hl7Transport:
    def __init__(self, destination: Destination, report: ReportConfig | None = None):
        assert destination.hl7 is not None
        self.destination = destination
        self.target = destination.hl7
        priority = (report or ReportConfig()).pneumonia_priority
        self.priority = None if priority == "none" else priority
        self._ssl_context = (client_ssl_context(destination.tls)
                             if destination.tls is not None else None)

    def connect(self) -> "Hl7Connection":
        client = MllpClient(self.destination.host, self.destination.port,
                            timeout=self.destination.timeout_seconds,
                            ssl_context=self._ssl_context)
        try:
            client.connect()
        except MllpError as error:
            raise ConnectFailed(str(error)) from None
        return Hl7Connection(self, client)


class Hl7Connection:
    def __init__(self, transport: Hl7Transport, client: MllpClient):
        self.transport = transport
        self.client = client
        self.lost_reason = ""

    def is_open(self) -> bool:
        return not self.lost_reason

    def store(self, path: Path) -> StoreResult:
        transport = self.transport
        try:
            facts = read_report_facts(path)
            message = oru_bytes(build_oru(facts, transport.target, transport.priority))
        except (ReportUnreadable, MessageNotBuilt, NotEncodable) as error:
            return StoreResult(False, str(error), permanent=True)
        control_id = message_control_id(facts.report_uid)
        try:
            answer = self.client.exchange(message)
        except NoAnswer as error:  # the connection is closed: the rest of the batch waits
            self.lost_reason = f"{error} (message {control_id})"
            return StoreResult(False, self.lost_reason)
        except MllpError as error:
            self.lost_reason = str(error)
            return StoreResult(False, self.lost_reason)
        try:
            ack = parse_ack(answer, transport.target.charset)
        except BadAck as error:
            return StoreResult(False, f"hl7-bad-ack: {error} (message {control_id})")
        if ack.control_id != control_id:
            return StoreResult(False, f"hl7-bad-ack: the ACK answers message "
                                      f"{ack.control_id or '(none)'}, not {control_id}")
        if ack.accepted:
            return StoreResult(True, f"{ack.code} (message {control_id})")
        said = redact(ack.text, facts)[:ANSWER_CHARS] or "no reason given"
        return StoreResult(False, f"hl7-{ack.code.lower()}: {said} (message {control_id})")

    def close(self) -> None:
        self.client.close()
