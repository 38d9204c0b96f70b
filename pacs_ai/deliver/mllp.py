"""MLLP, the Minimal Lower Layer Protocol HL7 v2 travels on: each message is framed as
<VT> message <FS><CR> over one TCP (or TLS) connection, and answered the same way.

One connection carries a batch of messages, each waiting for its answer before the next goes
(HL7's original acknowledgment mode). A peer that closes the connection after each answer (some
interface engines do) is reconnected to before the next message.
"""

from __future__ import annotations

import select
import socket
import ssl
import time

from pacs_ai.deliver.cstore_transport import tls_failure_reason

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ANSWER_BYTES = 1 << 20  # an ACK is small; a peer streaming more is not one


class MllpError(Exception):
    """A connection or framing failure; str() is the "code: detail" to record."""


class NoAnswer(MllpError):
    """The message went out and no answer came (timeout, or the peer closed the connection)."""


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


class MllpClient:
    def __init__(self, host: str, port: int, *, timeout: float,
                 ssl_context: ssl.SSLContext | None = None):
        self.host, self.port, self.timeout = host, port, timeout
        self.ssl_context = ssl_context
        self._socket: socket.socket | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self) -> None:
        """Open the connection; MllpError "connection-failed: ..." or "tls-...: ..."."""
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as error:
            raise MllpError(f"connection-failed: {self.where}: "
                            f"{error.strerror or error}") from None
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            except OSError as error:
                sock.close()
                reason = tls_failure_reason(error, in_handshake=True)
                raise MllpError(f"{reason} ({self.where})" if reason else
                                f"connection-failed: {self.where}: {error}") from None
        sock.settimeout(self.timeout)
        self._socket = sock

    def peer_closed(self) -> bool:
        """Whether the peer has closed the connection (or sent something unasked) since the
        last answer: then the next message needs a new connection."""
        if self._socket is None:
            return True
        try:
            readable, _, _ = select.select([self._socket], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def exchange(self, message: bytes) -> bytes:
        """Send one framed message and return the payload of the answer frame.
        MllpError when the message could not be sent; NoAnswer when no answer came."""
        if self._socket is None or self.peer_closed():
            self.connect()
        assert self._socket is not None
        try:
            self._socket.sendall(frame(message))
        except OSError as error:
            self.close()
            raise MllpError(f"connection-failed: {self.where}: sending: "
                            f"{error.strerror or error}") from None
        try:
            return self._read_frame()
        except socket.timeout:
            self.close()
            raise NoAnswer(f"no-answer: no ACK from {self.where} within "
                           f"{self.timeout:g} s") from None
        except OSError as error:
            self.close()
            raise NoAnswer(f"no-answer: {self.where} broke the connection before its ACK: "
                           f"{error.strerror or error}") from None

    def _read_frame(self) -> bytes:
        assert self._socket is not None
        received = b""
        deadline = time.monotonic() + self.timeout  # for the whole answer, however it trickles
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            self._socket.settimeout(remaining)
            chunk = self._socket.recv(65536)
            if not chunk:
                self.close()
                raise NoAnswer(f"no-answer: {self.where} closed the connection without an ACK")
            received += chunk
            start = received.find(START_BLOCK)
            end = received.find(END_BLOCK, start + 1) if start >= 0 else -1
            if end >= 0:
                return received[start + 1:end]
            if len(received) > MAX_ANSWER_BYTES:
                self.close()
                raise NoAnswer(f"no-answer: {self.where} sent more than "
                               f"{MAX_ANSWER_BYTES} bytes without an MLLP frame")

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
            self._socket = None
