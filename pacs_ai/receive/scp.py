"""The DICOM listener: C-ECHO and C-STORE over pynetdicom, into the spool and the job queue.

The C-STORE handler never classifies and never waits for the model. It answers Success only
once the instance is fsynced under spool/images/ and its job row is committed; otherwise:

    0xA700  out of resources: disk below the [storage] min_free_bytes floor (checked before
            anything is written), disk full, or the queue cannot be written (the sender keeps
            the image and retries later); or a deflated dataset that inflates past
            [limits] max_dataset_bytes, or past 16 MiB before its Pixel Data (inflated in
            chunks, the rest only counted: pacs_ai.receive.inflation).
    0xA900  the dataset's SOP Class UID is not the one the request announced.
    0xC000  cannot understand: the dataset cannot be parsed, or does not parse up to and through
            a whole Pixel Data element, or its uncompressed Pixel Data is shorter than Rows,
            Columns, frames, samples and Bits Allocated declare, or it declares more pixels
            than [limits] max_pixels (too-large, whatever the transfer syntax)
            (pacs_ai.receive.received): refused rather than acknowledged and failed later, so the
            modality keeps the image.
    0xC001  cannot understand: no usable SOP Instance UID, or not the one the request announced.

Each refusal is logged with its reason and counted (metric pacs_ai_rejected{reason}).
A dataset whose received bytes pass max_dataset_bytes gets no status: the association is
aborted as soon as they do (sockets.limit_message_bytes), so it is never held whole in memory.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from pacs_ai.config import Config, ListenerTLSConfig
from pacs_ai.errors import UserError
from pacs_ai.network.addresses import address_in, parse_networks
from pacs_ai.network.pynetdicom_internals import os_socket, register_server
from pacs_ai.network.sockets import (RequestDeadlines, limit_message_bytes,
                                     read_pdus_in_large_chunks, send_small_messages_at_once)
from pacs_ai.ops import audit, metrics
from pacs_ai.ops.audit import AuditTrail
from pacs_ai.queue.job_records import JobState, NewInstance, Stage, accepts_resend
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool, SpoolFullError
from pacs_ai.receive.arrivals import arrival_labels
from pacs_ai.receive.inflation import DatasetTooLarge
from pacs_ai.receive.received import ReceivedDataError, header_values, received_header

log = structlog.get_logger()

UNCOMPRESSED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                  DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
# Compressed syntaxes a modality or PACS commonly sends; accepted only where pydicom has a
# decoder installed for it, so an accepted image can always be decoded.
COMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51",   # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",      # RLE Lossless
)

PART10_PREAMBLE = b"\x00" * 128 + b"DICM"  # precedes the File Meta Information (PS3.10 7.1)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
CANNOT_UNDERSTAND_UID = 0xC001


def accepted_transfer_syntaxes() -> list[str]:
    from pydicom.pixels import get_decoder

    decodable = []
    for uid in COMPRESSED_TRANSFER_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                decodable.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return [str(uid) for uid in UNCOMPRESSED_TRANSFER_SYNTAXES] + decodable


def server_ssl_context(tls: ListenerTLSConfig) -> ssl.SSLContext:
    """TLS for the listener: our certificate, and client certificates checked against ca_file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    reason: str | None = None  # "code: detail" of a refusal

    def response(self) -> Dataset | int:
        if self.status == SUCCESS or self.reason is None:
            return self.status
        answer = Dataset()
        answer.Status = self.status
        answer.ErrorComment = self.reason[:64]  # LO: at most 64 characters
        return answer


@dataclass(frozen=True)
class ReceiveResult:
    """What StorageSCP._store did with one C-STORE, for the answer, the log and the audit."""
    outcome: StoreOutcome
    instance: NewInstance | None = None  # None until the header has been read and checked
    size: int = 0  # bytes of the Part 10 file to spool (0: not got that far, or a duplicate)
    duplicate: bool = False  # the instance already had a job


@dataclass
class _AssociationAudit:
    """What the audit trail keeps of one accepted association until it ends."""
    id: str
    calling_ae_title: str
    peer: str
    ended: str = "closed"  # "released" or "aborted" once pynetdicom says so
    stored: int = 0
    refused: int = 0


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the listener's own accept step and
    admission check (StorageSCP._connection_guards says why). Passed to `AE.make_server` as
    `server_class`, the public way to change them; `accept(server)` returns a connection and
    its address, `admit(request, client_address)` whether to serve it (socketserver closes a
    refused one)."""

    def __init__(self, *args, accept, admit, **kwargs):
        self._accept = accept
        self._admit = admit
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        return self._accept(self)

    def verify_request(self, request, client_address) -> bool:
        return self._admit(request, client_address)


def log_who_may_store(config: Config) -> None:
    """At every start, a warning when the listener takes any calling AE title (as asked) or
    none (nothing named yet), so neither goes unnoticed in the journal."""
    listener, source = config.listener, str(config.source or "(defaults)")
    if listener.accept_any_calling_ae:
        log.warning("listener_accepts_any_calling_ae", config=source, host=listener.host,
                    detail="any host that can reach the port may store films: "
                           "accept_any_calling_ae = true (or no config file); name the "
                           "modalities in [listener] allowed_calling_ae_titles instead")
    elif listener.refuses_every_caller:
        log.warning("listener_refuses_every_caller", config=source,
                    detail="[listener] allowed_calling_ae_titles is empty, so every association "
                           "is rejected (calling AE title not recognised): list the "
                           "modalities' AE titles there, or set accept_any_calling_ae = true "
                           "to take any caller; then restart")


class StorageSCP:
    """The association server. start() returns once the port is bound; stop() is graceful."""

    def __init__(self, config: Config, spool: Spool, store: JobStore,
                 audit_trail: AuditTrail | None = None):
        self.config = config
        self.spool = spool
        self.store = store
        self.audit = audit_trail or AuditTrail.disabled()
        self._node = audit.node_name()
        self._audited_associations: weakref.WeakKeyDictionary[object, _AssociationAudit] = \
            weakref.WeakKeyDictionary()
        self._server = None
        self._in_flight = 0
        self._in_flight_changed = threading.Condition()
        # Admitted connections' sockets -> peer address; one counts as open until its socket is
        # closed (or dropped), whatever pynetdicom's threads for it are doing.
        self._connections: weakref.WeakKeyDictionary[socket.socket, str] = \
            weakref.WeakKeyDictionary()
        self._request_deadlines = RequestDeadlines(
            config.limits.association_request_timeout_seconds, self._on_request_timeout)
        self._associations: weakref.WeakSet = weakref.WeakSet()  # requested and admitted
        self._associations_lock = threading.Lock()
        self._calling_ae_networks = {
            title: parse_networks(networks) for title, networks in config.listener.calling_ae_addresses.items()}
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        listener, limits = self.config.listener, self.config.limits
        ae = AE(ae_title=listener.ae_title)
        # pynetdicom counts every acceptor thread against its limit, connections that have sent
        # no A-ASSOCIATE-RQ yet included, so a few idle connections took every association
        # place. max_associations is applied to requested associations instead
        # (_on_association_requested); pynetdicom's own check stays as a backstop at the
        # open-connection cap.
        ae.maximum_associations = 2 * limits.max_associations
        ae.maximum_pdu_size = limits.max_pdu_bytes
        ae.acse_timeout = limits.acse_timeout_seconds
        ae.dimse_timeout = limits.dimse_timeout_seconds
        ae.network_timeout = limits.network_timeout_seconds
        ae.require_calling_aet = list(listener.calling_ae_titles)
        # A-ASSOCIATE-RJ permanent, "called AE title not recognised" (0x07) for a request
        # addressed to another AE title: a modality configured for another node, or a scan.
        ae.require_called_aet = listener.check_called_ae_title
        syntaxes = accepted_transfer_syntaxes()
        ae.add_supported_context(Verification)
        for sop_class in listener.sop_classes:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the listener is not running")
        return int(self._server.server_address[1])

    def _on_connection_open(self, event: Event) -> None:
        max_bytes = self.config.limits.max_dataset_bytes
        send_small_messages_at_once(event.assoc)
        read_pdus_in_large_chunks(event.assoc, max_bytes, self._on_pdu_too_large)
        limit_message_bytes(event.assoc, max_bytes, self._on_message_too_large)
        self._request_deadlines.watch(event.assoc)  # the TLS handshake counts against it too
        tls_error = finish_tls_handshake(event)
        if tls_error is not None:
            self._audit_security("tls-handshake-failed", str(event.address[0]), detail=tls_error)

    def _on_association_requested(self, event: Event) -> None:
        self._request_deadlines.requested(event.assoc)
        refusal = self._calling_ae_refusal(event.assoc)
        if refusal is not None:
            self._refuse_calling_ae(event.assoc, refusal)
        elif not self._admit_association(event.assoc):
            self._refuse_over_limit(event.assoc)

    def _calling_ae_refusal(self, association) -> str | None:
        """Why the calling AE title may not associate, where pynetdicom's own list check does
        not say it: every caller while no title is allowed and any-caller was not asked for
        ([listener] refuses_every_caller), or a title bound to addresses that the peer's is
        not among. A request addressed to another AE title is left to pynetdicom's check,
        which answers it first."""
        listener = self.config.listener
        primitive = association.requestor.primitive
        if listener.check_called_ae_title and \
                str(primitive.called_ae_title).strip() != listener.ae_title:
            return None
        networks = self._calling_ae_networks.get(str(primitive.calling_ae_title).strip())
        reason = None
        if listener.refuses_every_caller:
            reason = "calling-ae-not-allowed"
        elif networks is not None and not address_in(str(association.requestor.address),
                                                     networks):
            reason = "calling-ae-wrong-address"
        return reason

    def _refuse_calling_ae(self, association, reason: str) -> None:
        primitive = association.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        peer = str(association.requestor.address)
        metrics.REJECTED.labels(reason=reason).inc()
        fix = {}
        if self.config.listener.refuses_every_caller:
            fix = {"fix": f"no calling AE title is allowed yet: list the modalities in [listener] "
                          f"allowed_calling_ae_titles (e.g. [\"{calling}\"]), or set "
                          f"accept_any_calling_ae = true to take any caller, in "
                          f"{self.config.source or 'the config'}; then restart"}
        log.warning("association_rejected", reason=reason, calling_ae_title=calling,
                    called_ae_title=called, peer=peer, **fix)
        self._audit_security(reason, peer, calling_ae_title=calling, called_ae_title=called)
        # The answer an unknown calling AE title gets (pynetdicom's require_calling_aet):
        # rejected-permanent, service user, calling AE title not recognised, so the reply does
        # not tell a caller which addresses the title is bound to.
        association.acse.send_reject(0x01, 0x01, 0x03)
        association.kill()

    def _admit_association(self, association) -> bool:
        """Whether fewer than max_associations requested associations are running; if so this
        one is counted from now on."""
        with self._associations_lock:
            running = sum(1 for other in list(self._associations) if other.is_alive())
            if running >= self.config.limits.max_associations:
                return False
            self._associations.add(association)
            return True

    def _refuse_over_limit(self, association) -> None:
        metrics.REJECTED.labels(reason="association-limit").inc()
        log.warning("association_rejected", reason="association-limit",
                    calling_ae_title=str(association.requestor.primitive.calling_ae_title),
                    peer=association.requestor.address)
        # rejected-transient, service provider (presentation), local limit exceeded: the
        # modality tries again later. Then as pynetdicom does after its own rejections: kill()
        # waits until the A-ASSOCIATE-RJ is out before the connection is closed.
        association.acse.send_reject(0x02, 0x03, 0x02)
        association.kill()

    def _on_connection_close(self, event: Event) -> None:
        self._request_deadlines.closed(event.assoc)
        self._audit_association_end(event.assoc)

    # --- the audit trail -------------------------------------------------------------------

    def _audit_security(self, reason: str, peer: str, *, calling_ae_title: str | None = None,
                        called_ae_title: str | None = None, detail: str | None = None) -> None:
        self.audit.record(audit.security_alert(
            reason=reason, peer=peer, ae_title=self.config.listener.ae_title, node=self._node,
            calling_ae_title=calling_ae_title, called_ae_title=called_ae_title, detail=detail))

    def _audit_association_start(self, association) -> None:
        state = _AssociationAudit(audit.new_association_id(), association.requestor.ae_title,
                                  str(association.requestor.address))
        self._audited_associations[association] = state
        self.audit.record(audit.association_started(
            association_id=state.id, calling_ae_title=state.calling_ae_title, peer=state.peer,
            called_ae_title=self.config.listener.ae_title, node=self._node))

    def _on_association_ended(self, event: Event) -> None:
        state = self._audited_associations.get(event.assoc)
        if state is not None:
            state.ended = "released" if event.event is evt.EVT_RELEASED else "aborted"

    def _audit_association_end(self, association) -> None:
        state = self._audited_associations.pop(association, None)
        if state is None:
            return
        self.audit.record(audit.association_ended(
            association_id=state.id, calling_ae_title=state.calling_ae_title, peer=state.peer,
            called_ae_title=self.config.listener.ae_title, node=self._node, how=state.ended,
            stored=state.stored, refused=state.refused))

    def _audit_store(self, event: Event, result: ReceiveResult, header: Dataset | None) -> None:
        outcome = result.outcome
        association = event.assoc
        state = self._audited_associations.get(association)
        if state is not None:
            if outcome.status == SUCCESS:
                state.stored += 1
            else:
                state.refused += 1
        request = event.request

        def value(keyword: str) -> str | None:
            found = header.get(keyword) if header is not None else None
            return str(found).strip() or None if found is not None else None

        self.audit.record(audit.instance_received(
            calling_ae_title=association.requestor.ae_title,
            peer=str(association.requestor.address),
            called_ae_title=self.config.listener.ae_title, node=self._node,
            status=outcome.status, reason=outcome.reason,
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            study_instance_uid=value("StudyInstanceUID"),
            series_instance_uid=value("SeriesInstanceUID"),
            patient_id=value("PatientID") if self.config.audit.include_patient_id else None,
            association_id=state.id if state is not None else None,
            duplicate=result.duplicate))

    def _on_pdu_too_large(self, association, size: int) -> None:
        metrics.REJECTED.labels(reason="pdu-too-large").inc()
        log.warning("association_aborted", reason="pdu-too-large", pdu_bytes=size,
                    limit=self.config.limits.max_dataset_bytes,
                    peer=str(association.requestor.address))

    def _on_message_too_large(self, association, message, size: int) -> None:
        command = getattr(message, "command_set", None)
        metrics.REJECTED.labels(reason="dataset-too-large").inc()
        log.warning("association_aborted", reason="dataset-too-large", bytes_received=size,
                    limit=self.config.limits.max_dataset_bytes,
                    sop_instance_uid=str(getattr(command, "AffectedSOPInstanceUID", "") or ""),
                    calling_ae_title=association.requestor.ae_title,
                    peer=str(association.requestor.address))

    def _on_request_timeout(self, association) -> None:
        metrics.REJECTED.labels(reason="association-request-timeout").inc()
        log.warning("connection_refused", reason="association-request-timeout",
                    peer=str(association.requestor.address),
                    seconds=self.config.limits.association_request_timeout_seconds)

    def start(self) -> None:
        listener = self.config.listener
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_CONN_OPEN, self._on_connection_open),
                    (evt.EVT_REQUESTED, self._on_association_requested),
                    (evt.EVT_CONN_CLOSE, self._on_connection_close),
                    (evt.EVT_RELEASED, self._on_association_ended),
                    (evt.EVT_ABORTED, self._on_association_ended)]
        ssl_context = server_ssl_context(self.config.tls) if self.config.tls.enabled else None
        accept, admit = self._connection_guards()
        try:
            # pynetdicom's start_server(block=False), with our server class
            self._server = self.ae.make_server((listener.host, listener.port),
                                               evt_handlers=handlers, ssl_context=ssl_context,
                                               server_class=GuardedAssociationServer,
                                               accept=accept, admit=admit)
        except OSError as error:
            raise UserError(f"cannot listen on {listener.host}:{listener.port}: "
                            f"{error.strerror or error}; is another DICOM service using the port? "
                            "Set [listener] port or host in the config") from None
        register_server(self.ae, self._server)
        self._request_deadlines.start()
        threading.Thread(target=make_target(self._server.serve_forever),
                         name=f"AcceptorServer@{self.port}", daemon=True).start()

    def _connection_guards(self):
        """The server's accept step and admission check (GuardedAssociationServer), which bound
        what a misbehaving peer can hold.

        pynetdicom applies max_associations only once an association request arrives, and reads
        PDUs from a blocking socket: a peer that connects and stalls (or announces a huge PDU
        and sends nothing) would hold two threads forever. So every accepted socket gets the
        network timeout, one that sends no A-ASSOCIATE-RQ within the association request
        timeout is dropped (RequestDeadlines), and open connections, TLS ones still in their
        handshake included, are capped at accept time: in all, and per peer address so that
        one noisy host leaves room for the others. Only open sockets count: a connection the
        peer closed frees its place at once.
        """
        limits = self.config.limits
        timeout = limits.network_timeout_seconds
        connection_cap = 2 * limits.max_associations
        per_address_cap = limits.max_connections_per_address

        def accept(server) -> tuple[socket.socket, tuple[str, int]]:
            client, address = server.socket.accept()
            client.settimeout(timeout)  # also bounds the TLS handshake
            if server.ssl_context:
                # The handshake is done in the connection's own thread (finish_tls_handshake):
                # done here, in the accept loop, one peer that never sends its ClientHello would
                # stop every other connection for the whole network timeout.
                client = server.ssl_context.wrap_socket(client, server_side=True,
                                                        do_handshake_on_connect=False)
            return client, address

        allowed_networks = parse_networks(self.config.listener.allowed_peer_addresses)

        def admit_connection(request: socket.socket, client_address: tuple[str, int]) -> bool:
            peer = str(client_address[0])
            open_peers = self._open_connection_peers()
            reason, limit = None, None
            if allowed_networks and not address_in(peer, allowed_networks):
                reason = "peer-address-not-allowed"
            elif open_peers.count(peer) >= per_address_cap:
                reason, limit = "connection-limit-per-address", per_address_cap
            elif len(open_peers) >= connection_cap:
                reason, limit = "connection-limit", connection_cap
            if reason is None:
                self._connections[request] = peer
                return True
            metrics.REJECTED.labels(reason=reason).inc()
            log.warning("connection_refused", reason=reason, peer=peer,
                        open_connections_limit=limit)
            if reason == "peer-address-not-allowed":
                self._audit_security(reason, peer)
            return False

        return accept, admit_connection

    def _open_connection_peers(self) -> list[str]:
        """The peer address of each admitted connection whose socket is still open."""
        return [peer for sock, peer in list(self._connections.items()) if sock.fileno() != -1]

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let running associations finish for up to `grace_seconds`, abort the
        rest, then wait for C-STORE handlers still writing (so the queue is not closed under
        them)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        self._request_deadlines.stop()
        deadline = time.monotonic() + grace_seconds
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for association in remaining:
            # Shut the transport first so a reader blocked on a stalled peer returns at once;
            # abort() waits for that reader, so it runs off this thread.
            transport = os_socket(association)
            if transport is not None:
                try:
                    transport.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threading.Thread(target=association.abort, name="abort-association",
                             daemon=True).start()
        if remaining:
            log.warning("associations_aborted_at_shutdown", count=len(remaining))
        with self._in_flight_changed:
            self._in_flight_changed.wait_for(lambda: self._in_flight == 0, timeout=30)
        for association in remaining:
            association.join(timeout=5)

    # --- handlers ---------------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        log.info("echo_received", calling_ae_title=event.assoc.requestor.ae_title,
                 peer=event.assoc.requestor.address)
        return SUCCESS

    def _on_rejected(self, event: Event) -> None:
        listener = self.config.listener
        calling = event.assoc.requestor.ae_title
        called = str(event.assoc.requestor.primitive.called_ae_title).strip()
        allowed = listener.calling_ae_titles
        # pynetdicom's order: a wrong called AE title overrides a caller not allowed
        if listener.check_called_ae_title and called != listener.ae_title:
            reason = "called-ae-not-recognised"
        elif allowed and calling not in allowed:
            reason = "calling-ae-not-allowed"
        else:
            reason = "association-limit"
        metrics.REJECTED.labels(reason=reason).inc()
        log.warning("association_rejected", reason=reason, calling_ae_title=calling,
                    called_ae_title=called, peer=event.assoc.requestor.address)
        if reason != "association-limit":  # the others: a peer that is not who may send
            self._audit_security(reason, str(event.assoc.requestor.address),
                                 calling_ae_title=calling, called_ae_title=called)

    def _on_accepted(self, event: Event) -> None:
        """An association whose every presentation context was refused (say a CT modality, or
        a syntax we cannot decode) is accepted by ACSE rules but can do nothing: counted and
        logged as refused at negotiation, with the SOP classes it offered."""
        association = event.assoc
        if association.accepted_contexts:
            self._audit_association_start(association)
            return
        offered = sorted({str(cx.abstract_syntax) for cx in association.rejected_contexts})
        metrics.REJECTED.labels(reason="no-acceptable-presentation-context").inc()
        log.warning("association_rejected", reason="no-acceptable-presentation-context",
                    calling_ae_title=association.requestor.ae_title,
                    peer=association.requestor.address, offered_sop_classes=offered[:20])

    def _on_store(self, event: Event) -> Dataset | int:
        started = time.perf_counter()
        with self._in_flight_changed:
            self._in_flight += 1
        received: dict[str, Dataset] = {}  # the dataset's header, once read (for the audit)
        try:
            result = self._store(event, received)
        except Exception as error:  # never let a bug take the association (or us) down
            log.exception("store_failed_unexpectedly", error=str(error))
            result = ReceiveResult(
                StoreOutcome(OUT_OF_RESOURCES, f"internal-error: {type(error).__name__}"))
        finally:
            with self._in_flight_changed:
                self._in_flight -= 1
                self._in_flight_changed.notify_all()
        fields = dict(calling_ae_title=event.assoc.requestor.ae_title,
                      sop_class_uid=str(event.request.AffectedSOPClassUID or ""),
                      sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""),
                      transfer_syntax=str(event.context.transfer_syntax), bytes=result.size,
                      milliseconds=round((time.perf_counter() - started) * 1000, 1))
        outcome = result.outcome
        if outcome.status == SUCCESS:
            metrics.RECEIVED.inc()
            if not result.duplicate and "header" in received:  # what arrives: drift watch
                metrics.ARRIVALS.labels(**arrival_labels(
                    received["header"], str(event.context.transfer_syntax))).inc()
            log.info("instance_received", study_instance_uid=result.instance.study_instance_uid,
                     duplicate=result.duplicate, **fields)
        else:
            metrics.REJECTED.labels(reason=metrics.reason_code(outcome.reason or "unknown")).inc()
            log.warning("instance_refused", status=f"0x{outcome.status:04X}",
                        reason=outcome.reason, **fields)
        try:
            self._audit_store(event, result, received.get("header"))
        except Exception as error:  # the audit trail must never cost the modality its answer
            self.audit.lose(error)
        return outcome.response()

    def _store(self, event: Event, received: dict[str, Dataset]) -> ReceiveResult:
        request = event.request
        try:
            dataset = received_header(event.request.DataSet, event.context.transfer_syntax,
                                      self.config.limits)
            received["header"] = dataset
            sop_instance_uid = str(dataset.get("SOPInstanceUID", "") or "").strip()
            sop_class_uid = str(dataset.get("SOPClassUID", "") or "").strip()
            study_uid = str(dataset.get("StudyInstanceUID", "") or "").strip() or None
        except DatasetTooLarge as error:
            return ReceiveResult(StoreOutcome(OUT_OF_RESOURCES, f"dataset-too-large: {error}"))
        except ReceivedDataError as error:
            return ReceiveResult(StoreOutcome(CANNOT_UNDERSTAND, str(error)))
        except Exception as error:  # pydicom raises many kinds on a malformed stream
            return ReceiveResult(StoreOutcome(CANNOT_UNDERSTAND,
                                              f"unparseable: {type(error).__name__}: {error}"))
        if not sop_instance_uid or sop_instance_uid != str(request.AffectedSOPInstanceUID):
            return ReceiveResult(StoreOutcome(CANNOT_UNDERSTAND_UID, "bad-sop-instance-uid: "
                                              "missing or not the one in the request"))
        if sop_class_uid != str(request.AffectedSOPClassUID):
            return ReceiveResult(StoreOutcome(DOES_NOT_MATCH_SOP_CLASS, "sop-class-mismatch: "
                                              "dataset and request differ"))

        instance = NewInstance(sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                               study_instance_uid=study_uid,
                               calling_ae_title=event.assoc.requestor.ae_title,
                               peer_address=str(event.assoc.requestor.address),
                               **header_values(dataset))
        existing = self.store.find(sop_instance_uid)
        if existing is not None and not accepts_resend(existing):
            # already durable: idempotent; but a re-send is the modality asking again, so a
            # report that could not be delivered is sent again (its image is not needed)
            if existing.state == JobState.FAILED and existing.stage == Stage.DELIVER:
                requeued = self.store.redeliver(existing.id)
                log.info("redelivery_requested", sop_instance_uid=sop_instance_uid,
                         report_uid=existing.report_uid, deliveries=requeued)
            return ReceiveResult(StoreOutcome(SUCCESS), instance, duplicate=True)

        # The received bytes as they came, behind a Part 10 header, written from pynetdicom's
        # buffer: event.encoded_dataset() would copy a 10 MB film twice more in memory.
        header = PART10_PREAMBLE + encode_file_meta(event.file_meta)
        body = event.request.DataSet.getbuffer()
        size = len(header) + len(body)
        try:
            self.spool.check_room(size, self.config.storage.min_free_bytes)
            staged = self.spool.stage(header, body)
        except SpoolFullError as error:
            return ReceiveResult(StoreOutcome(OUT_OF_RESOURCES, f"disk-full: {error.strerror}"),
                                 instance, size)
        except OSError as error:
            return ReceiveResult(StoreOutcome(OUT_OF_RESOURCES,
                                              f"write-failed: {error.strerror or error}"),
                                 instance, size)
        finally:
            body.release()  # pynetdicom closes its buffer after the handler

        target = self.spool.image_path(sop_instance_uid)

        def place() -> str:
            self.spool.commit(staged, target)
            return self.spool.relative(target)

        try:
            created = self.store.admit(instance, place)
        except Exception as error:  # sqlite3 or OS errors: not recorded, so not acknowledged
            return ReceiveResult(StoreOutcome(OUT_OF_RESOURCES, f"queue-write-failed: {error}"),
                                 instance, size)
        finally:
            staged.unlink(missing_ok=True)  # gone already when placed
        return ReceiveResult(StoreOutcome(SUCCESS), instance, size, duplicate=not created)


def finish_tls_handshake(event: Event) -> str | None:
    """Complete a TLS connection's handshake in the connection's own thread (the accept loop
    leaves it undone, see StorageSCP._connection_guards), and record one that fails: a
    plain-TCP client on the TLS port, an untrusted or missing client certificate, a peer that
    times out. Such a connection is closed and its association ends; nothing else waits on it.
    Returns the TLS error when the handshake failed, else None."""
    raw = os_socket(event.assoc)
    if not isinstance(raw, ssl.SSLSocket):
        return None
    try:
        raw.do_handshake()
    except (OSError, ValueError) as error:  # ssl.SSLError, timeouts, resets
        metrics.REJECTED.labels(reason="tls-handshake-failed").inc()
        log.warning("connection_refused", reason="tls-handshake-failed",
                    peer=str(event.address[0]), error=str(error))
        raw.close()  # the association then ends at once (RequestDeadlines.closed)
        return str(error)
    return None
