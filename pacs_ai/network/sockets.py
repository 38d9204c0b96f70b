"""Socket options for DICOM associations, and bounds on what one connection can make the
listener hold: the deadline for its A-ASSOCIATE-RQ, and the bytes of one PDU and one message."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from pacs_ai.network import pynetdicom_internals as internals

log = structlog.get_logger()


def send_small_messages_at_once(association: Any) -> None:
    """Turn off Nagle's algorithm on an association's TCP socket.

    DIMSE messages are written as several small PDUs (command, then dataset) before the peer
    answers; with Nagle on, the last small write waits for the peer's delayed ACK, about 40 ms
    per message on Linux. Measured: a 40-report C-STORE run to a pynetdicom PACS took 48 ms per
    report with Nagle and 7 ms without (docs/benchmarks.md).
    """
    raw = internals.os_socket(association)
    if raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as error:  # a closed socket: the association fails on its own
        log.debug("tcp_nodelay_failed", error=str(error))


# One read asks for at most this much; the buffer grows only with bytes that really arrived,
# so a peer announcing a 4 GB PDU and sending nothing costs nothing.
READ_CHUNK_BYTES = 1 << 20


def read_pdus_in_large_chunks(association: Any, max_pdu_bytes: int | None = None,
                              on_too_large: Callable[[Any, int], None] | None = None) -> None:
    """Read each PDU in reads of up to 1 MiB instead of pynetdicom's 4 KiB.

    pynetdicom's `AssociationSocket.recv` reads at most 4096 bytes per call, so a 10 MB film
    costs about 2,500 interpreter round trips (and lock hand-overs) in the listener thread:
    4.3-4.8 ms of its CPU against 1.1-2.1 ms this way (`bench/pdu_reads.py`). This replaces
    that method on this association's transport only, with the same contract: return
    `nr_bytes` bytes, or fewer when the peer closed the connection; timeouts and socket errors
    propagate as before.

    pynetdicom reads a PDU whole, however long its header says it is, before looking at it:
    a body longer than `max_pdu_bytes` is not read at all (`on_too_large(association,
    nr_bytes)` is called) and reads as a connection closed, so pynetdicom ends the association.
    """
    if internals.os_socket(association) is None:
        return

    def recv(nr_bytes: int) -> bytearray:
        if max_pdu_bytes is not None and nr_bytes > max_pdu_bytes:
            if on_too_large is not None:
                on_too_large(association, nr_bytes)
            return bytearray()
        chunks = []
        received = 0
        while received < nr_bytes:
            chunk = bytearray(min(nr_bytes - received, READ_CHUNK_BYTES))
            filled = _fill(internals.os_socket(association), chunk)
            received += filled
            if filled < len(chunk):  # the peer closed the connection: what we have so far
                chunks.append(chunk[:filled])
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else bytearray().join(chunks)

    internals.replace_pdu_reader(association, recv)


def _fill(sock: socket.socket, buffer: bytearray) -> int:
    """Read into `buffer` until it is full or the peer closes; the number of bytes read."""
    view = memoryview(buffer)
    filled = 0
    try:
        while filled < len(buffer):
            count = sock.recv_into(view[filled:])
            if count == 0:
                break
            filled += count
    finally:
        view.release()
    return filled


def limit_message_bytes(association: Any, max_bytes: int,
                        on_too_large: Callable[[Any, Any, int], None]) -> None:
    """Abort an association as soon as the DIMSE message it is receiving passes `max_bytes`.

    pynetdicom gathers each message (a C-STORE's command and dataset) in memory until its last
    fragment arrives, with no bound: a 400 MB dataset cost 400 MB, ten of them the machine.
    This wraps the association's `dimse.receive_primitive`, which the DUL thread calls for each
    P-DATA received; past the limit the partial message is dropped (its memory with it),
    `on_too_large(association, message, size)` is called, and an A-ABORT goes out (the DUL
    sends it before reading anything more; what the peer still sends is then ignored).
    """
    def check_size() -> None:
        in_progress = internals.message_in_progress(association)
        if in_progress is None:  # complete: handed to the association's thread
            return
        message, size = in_progress
        if size <= max_bytes:
            return
        internals.drop_message_in_progress(association)
        on_too_large(association, message, size)
        association.acse.send_abort(0x02)  # source: service provider

    internals.after_each_received_fragment(association, check_size)


def shut_down(sock: socket.socket | None) -> None:
    """Shut a connection both ways without closing it: a thread blocked reading it (pynetdicom's
    DUL, a TLS handshake) returns at once and ends the connection its own way.

    `socket.socket.shutdown` is called directly because `SSLSocket.shutdown` also drops the TLS
    object under a handshake that may be running in another thread.
    """
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed or reset
        pass


class RequestDeadlines:
    """Connections that have not yet sent an A-ASSOCIATE-RQ, each with a deadline.

    `watch` when a connection opens, `requested` when its request arrives, `closed` when it
    closes. A connection that closes first has its acceptor thread ended at once (so it frees
    its place under the association limit); one still silent at its deadline is shut down and
    `on_expired(association)` is called. One thread serves every connection, so silent peers
    cost no extra thread each.
    """

    def __init__(self, seconds: float, on_expired: Callable[[Any], None]):
        self.seconds = seconds
        self._on_expired = on_expired
        self._pending: dict[Any, float] = {}  # association -> monotonic deadline
        self._changed = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="association-request-deadlines",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._pending.clear()
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def watch(self, association: Any) -> None:
        with self._changed:
            self._pending[association] = time.monotonic() + self.seconds
            self._changed.notify_all()

    def requested(self, association: Any) -> None:
        with self._changed:
            self._pending.pop(association, None)

    def closed(self, association: Any) -> None:
        with self._changed:
            waiting = self._pending.pop(association, None) is not None
        if waiting:
            # pynetdicom's acceptor thread waits up to the ACSE timeout for the request, and
            # nothing wakes it when the connection closes first: a connect-and-close (a port
            # scan, a TCP health probe) held its thread, and its place under the association
            # limit, for 30 s.
            internals.end_acceptor_wait(association)

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._stopped:
                    return
                now = time.monotonic()
                expired = [a for a, deadline in self._pending.items() if deadline <= now]
                for association in expired:
                    del self._pending[association]
                if not expired:
                    next_deadline = min(self._pending.values(), default=None)
                    self._changed.wait(None if next_deadline is None else next_deadline - now)
                    continue
            for association in expired:  # outside the lock: logging, socket calls
                try:
                    self._on_expired(association)  # logged before the peer sees the close
                except Exception as error:  # a logging problem must not stop the deadlines
                    log.error("request_deadline_callback_failed", error=str(error))
                shut_down(internals.os_socket(association))
                internals.end_acceptor_wait(association)
