"""Delivery of reports: one thread per destination, with exponential backoff.

Each destination has its own thread, so a PACS that is down or slow delays only its own
deliveries, never receiving, classifying or the other destinations. The schedule
(attempts, next attempt time) lives in the job queue, so backoff continues across restarts.

The wire is the destination's transport (pacs_ai.deliver.transport): C-STORE (pacs_ai.deliver.cstore_transport),
STOW-RS (pacs_ai.deliver.stow_transport), an HL7 ORU^R01 over MLLP (pacs_ai.deliver.hl7_transport) or a FHIR
DiagnosticReport (pacs_ai.deliver.fhir_transport); everything else here is the same for all. A failed
attempt (no connection, a refusal) is retried after `RetryPolicy.delay_after(attempts)` until
`RetryPolicy.exhausted`, or at once given up when the transport says a retry cannot help; then
the delivery is marked failed with the last error (`pacs-ai retry` requeues it).

A destination seen working again (a report stored, or its C-ECHO answered) makes its deliveries
that wait out a backoff because it could not be reached due at once (`release_waiting`): with
the default 900 s maximum delay, a long outage would otherwise hold every waiting report for up
to 15 minutes after the PACS is back. Deliveries it refused keep their backoff.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from pacs_ai.config import Destination, ReportConfig, RetryPolicy
from pacs_ai.deliver.transport import ConnectFailed, StoreResult, Transport, unreachable
from pacs_ai.ops import audit, metrics
from pacs_ai.ops.audit import AuditTrail
from pacs_ai.queue.job_records import Delivery, DeliveryObject, Job, Stage
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool

log = structlog.get_logger()

BATCH_LIMIT = 50  # reports sent over one connection before it is closed
IDLE_POLL_SECONDS = 1.0


def release_waiting(store: JobStore, destination: str, seen: str) -> int:
    """The destination works again (`seen`: "delivery" or "c-echo"): its deliveries waiting
    out a backoff because it could not be reached are due now. Returns how many."""
    released = store.release_waiting(destination, unreachable)
    if released:
        log.info("deliveries_released", destination=destination, deliveries=released,
                 seen=seen)
    return released


def transport_for(destination: Destination, report: ReportConfig | None = None) -> Transport:
    """The destination's transport; `report` ([report]) gives the result messages of HL7 and
    FHIR destinations their pneumonia priority."""
    if destination.dicomweb is not None:
        from pacs_ai.deliver.stow_transport import StowTransport

        return StowTransport(destination)
    if destination.hl7 is not None:
        from pacs_ai.deliver.hl7_transport import Hl7Transport

        return Hl7Transport(destination, report)
    if destination.fhir is not None:
        from pacs_ai.deliver.fhir_transport import FhirTransport

        return FhirTransport(destination, report)
    from pacs_ai.deliver.cstore_transport import CStoreTransport

    return CStoreTransport(destination)


class DestinationSender(threading.Thread):
    def __init__(self, destination: Destination, spool: Spool, store: JobStore,
                 policy: RetryPolicy, stop: threading.Event, wake: threading.Event,
                 on_job_finished: Callable[[Job], None],
                 audit_trail: AuditTrail | None = None, include_patient_id: bool = False,
                 report: ReportConfig | None = None):
        super().__init__(name=f"sender-{destination.name}", daemon=True)
        self.destination = destination
        self.spool = spool
        self.store = store
        self.policy = policy
        self.stop_event = stop
        self.wake = wake
        self.on_job_finished = on_job_finished
        self.transport = transport_for(destination, report)
        self.audit = audit_trail or AuditTrail.disabled()
        self.include_patient_id = include_patient_id  # [audit] include_patient_id

    def run(self) -> None:
        name = self.destination.name
        while not self.stop_event.is_set():
            self.wake.clear()
            try:
                due = self.store.due_deliveries(name, time.time(), BATCH_LIMIT)
                if due:
                    self.send(due)
                    continue
                next_at = self.store.next_attempt_at(name)
            except Exception as error:  # never let one bad round end deliveries for good
                log.exception("sender_round_failed", destination=name, error=str(error))
                self.stop_event.wait(IDLE_POLL_SECONDS)
                continue
            wait = IDLE_POLL_SECONDS if next_at is None else min(
                max(next_at - time.time(), 0.01), IDLE_POLL_SECONDS)
            self.wake.wait(wait)

    def send(self, due: list[Delivery]) -> None:
        """Send the due reports over one connection; record each outcome."""
        try:
            connection = self.transport.connect()
        except ConnectFailed as error:
            self._attempts_failed(due, str(error))
            return
        released = False
        try:
            for index, delivery in enumerate(due):
                if self.stop_event.is_set() or not connection.is_open():
                    if not connection.is_open():
                        self._attempts_failed(due[index:], connection.lost_reason)
                    return  # on stop, the rest stay due and are sent after the restart
                if self._send_one(connection, delivery) and not released:
                    released = True  # once per batch: the rest come in the next one
                    release_waiting(self.store, self.destination.name, "delivery")
        finally:
            connection.close()

    def _send_one(self, connection, delivery: Delivery) -> bool:
        """Store one object; record the outcome. True when it was stored."""
        result: StoreResult = connection.store(self.spool.resolve(delivery.report_file))
        if not result.stored:
            self._attempt_failed(delivery, result.detail, permanent=result.permanent)
            return False
        finished = self.store.delivery_succeeded(delivery.job_id, self.destination.name,
                                                 delivery.object)
        seconds = time.time() - delivery.received_at
        if delivery.object == DeliveryObject.REPORT:  # the metrics count reports, not heat-maps
            metrics.REPORTED.labels(destination=self.destination.name).inc()
            metrics.RECEIVE_TO_DELIVERY_SECONDS.observe(seconds)
        log.info("report_delivered", destination=self.destination.name,
                 report_uid=delivery.report_uid, sop_instance_uid=delivery.sop_instance_uid,
                 status=result.detail, attempts=delivery.attempts + 1,
                 seconds_since_received=round(seconds, 3),
                 **({"object": delivery.object}
                    if delivery.object != DeliveryObject.REPORT else {}))
        self._audit(delivery, stored=True, detail=result.detail, given_up=False)
        if finished is not None:
            self.on_job_finished(finished)
        return True

    def _attempts_failed(self, deliveries: list[Delivery], error: str) -> None:
        for delivery in deliveries:
            self._attempt_failed(delivery, error)

    def _attempt_failed(self, delivery: Delivery, error: str, *, permanent: bool = False) -> None:
        now = time.time()
        attempts = delivery.attempts + 1
        age = now - (delivery.first_attempt_at or now)
        give_up = permanent or self.policy.exhausted(attempts, age)
        retry_at = None if give_up else now + self.policy.delay_after(attempts)
        finished = self.store.delivery_failed(delivery.job_id, self.destination.name, error,
                                              retry_at=retry_at, object=delivery.object)
        fields = dict(destination=self.destination.name, report_uid=delivery.report_uid,
                      sop_instance_uid=delivery.sop_instance_uid, attempts=attempts, error=error,
                      **({"object": delivery.object}
                         if delivery.object != DeliveryObject.REPORT else {}))
        if give_up:
            metrics.FAILED.labels(stage=Stage.DELIVER).inc()
            log.error("delivery_failed", **fields)
        else:
            log.warning("delivery_retry_scheduled", retry_in_seconds=round(retry_at - now, 3),
                        **fields)
        self._audit(delivery, stored=False, detail=error, given_up=give_up)
        if finished is not None:
            self.on_job_finished(finished)

    def _audit(self, delivery: Delivery, *, stored: bool, detail: str, given_up: bool) -> None:
        """The audit trail's transfer-out record of one attempt (pacs_ai.ops.audit); never lets an
        audit problem disturb the delivery."""
        if not self.audit.enabled:
            return
        try:
            self.audit.record(self._transfer_out(delivery, stored=stored, detail=detail,
                                                 given_up=given_up))
        except Exception as error:
            self.audit.lose(error)

    def _transfer_out(self, delivery: Delivery, *, stored: bool, detail: str,
                      given_up: bool) -> audit.AuditMessage:
        destination = self.destination
        study_uid, sop_class_uid, patient_id = report_identity(
            self.spool.resolve(delivery.report_file))
        return audit.report_sent(
            calling_ae_title=destination.calling_ae_title, node=audit.node_name(),
            destination=destination.name, destination_ae_title=destination.ae_title,
            destination_address=destination_address(destination), stored=stored,
            detail=detail, given_up=given_up, report_uid=delivery.report_uid,
            source_sop_instance_uid=delivery.sop_instance_uid,
            attempts=delivery.attempts + 1, study_instance_uid=study_uid,
            sop_class_uid=sop_class_uid,
            patient_id=patient_id if self.include_patient_id else None,
            object_kind=delivery.object)


def destination_address(destination: Destination) -> str:
    """The host a destination's reports go to (of its URL for DICOMweb and FHIR)."""
    if destination.http is not None:
        from urllib.parse import urlsplit

        return urlsplit(destination.http.url).hostname or destination.http.url
    return destination.host


def report_identity(path) -> tuple[str | None, str | None, str | None]:
    """Study Instance UID, SOP Class UID and Patient ID of a report file, for its audit
    record; None for what cannot be read (a report file gone or broken: the record is kept)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
            "StudyInstanceUID", "SOPClassUID", "PatientID"])
    except Exception:
        return None, None, None
    values = [str(dataset.get(keyword, "") or "").strip() or None
              for keyword in ("StudyInstanceUID", "SOPClassUID", "PatientID")]
    return values[0], values[1], values[2]
