"""A RIS's HL7 interface for tests: an MLLP receiver that checks each message with `hl7apy`
and answers as told.

`MllpReceiver(script)` takes HL7 v2 messages over MLLP (plain or TLS), parses each with
hl7apy at its strict level, validates it against the v2.5.1 ORU^R01 structure (errors and
warnings kept per message), and answers the N-th message by the N-th action of `script` (then
`default`):

    "AA", "AE", "AR"   an ACK with that code (built with hl7apy; AE/AR with an ERR segment and
                       the text `error_text`)
    "none"             no answer: the connection stays open until the sender gives up
    "close"            the connection is closed without an answer

Like a RIS, it reads each message in the character set its MSH-18 names (HL7 table 0211: UNICODE
UTF-8, 8859/1, ASCII, or ASCII when empty; bytes not valid in it are an error of that message)
and answers in the same one, or in `ack_charset` when given (a RIS answering in its own).

Like a RIS that files each message once, `kept()` holds one message per control ID (MSH-10)
among those answered AA: a message sent again with the same control ID is known as the same.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hl7apy.base_datatypes import ST
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

from testbed.dicom_peers import LOCALHOST, wait_until

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
ACTIONS = ("AA", "AE", "AR", "none", "close")
# MSH-18 (HL7 table 0211) -> Python codec, the ones a RIS in these tests reads
CODECS = {"UNICODE UTF-8": "utf-8", "8859/1": "iso-8859-1", "ASCII": "ascii", "": "ascii"}


@dataclass
class Received:
    raw: bytes  # the frame's payload as sent
    text: str  # decoded in the character set MSH-18 names
    message: Any  # the hl7apy Message, parsed at the strict level; None when it could not be
    errors: list[str]  # parse or structure errors (none for a valid ORU^R01)
    warnings: list[str]  # hl7apy's validation warnings (lengths, table values)
    action: str  # how it was answered
    connection: int  # which connection it came on (1, 2, ...)

    @property
    def control_id(self) -> str:
        return self.field("MSH", 10)

    def segments(self, name: str) -> list[Any]:
        """The message's `name` segments (hl7apy, in order), however they are grouped."""
        return _segments(self.text, name)

    def field(self, segment: str, number: int, index: int = 0) -> str:
        """Field `number` of the `index`-th `segment` as ER7 (still escaped); "" if absent."""
        return _field(self.text, segment, number, index)


def _segments(text: str, name: str) -> list[Any]:
    try:
        flat = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT,
                             find_groups=False)
    except Exception:
        return []
    return list(flat.children.get(name) or [])


def _field(text: str, segment: str, number: int, index: int = 0) -> str:
    segments = _segments(text, segment)
    if index >= len(segments):
        return ""
    return getattr(segments[index], f"{segment.lower()}_{number}").to_er7()


def escaped(value: str) -> str:
    """`value` as hl7apy writes it in a message (the delimiters escaped)."""
    return ST(value, validation_level=VALIDATION_LEVEL.TOLERANT).to_er7()


def charset_of(payload: bytes) -> str:
    """MSH-18 of a message's bytes (the MSH segment is ASCII whatever the character set)."""
    msh = payload.split(b"\r", 1)[0].decode("ascii", errors="replace").split("|")
    return msh[17] if len(msh) > 17 else ""


def decode(payload: bytes) -> tuple[str, list[str]]:
    """A message's text in the character set its MSH-18 names, and the errors of reading it."""
    charset = charset_of(payload)
    codec = CODECS.get(charset)
    if codec is None:
        return payload.decode("utf-8", errors="replace"), [f"unknown MSH-18 {charset!r}"]
    try:
        return payload.decode(codec), []
    except UnicodeDecodeError as error:
        return (payload.decode(codec, errors="replace"),
                [f"bytes not valid in MSH-18 {charset or 'ASCII'}: {error}"])


def build_ack(received_text: str, code: str, text: str = "", charset: str = "") -> bytes:
    """An ACK for the message `received_text`, built with hl7apy, in `charset` (an MSH-18 value;
    by default the one the message names)."""
    charset = charset or _field(received_text, "MSH", 18)
    level = VALIDATION_LEVEL.TOLERANT
    ack = Message("ACK", version="2.5.1", validation_level=level)
    ack.msh.msh_3.hd_1 = "TEST-RIS"
    sender = _field(received_text, "MSH", 3).split("^")[0]
    if sender:
        ack.msh.msh_5.hd_1 = sender
    ack.msh.msh_7 = time.strftime("%Y%m%d%H%M%S")
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = f"ACK{int(time.time() * 1000) % 10**12}"
    ack.msh.msh_11 = "P"
    ack.msh.msh_12 = "2.5.1"
    if charset:
        ack.msh.msh_18 = charset
    msa = ack.add_segment("MSA")
    msa.msa_1 = code
    msa.msa_2 = escaped(_field(received_text, "MSH", 10) or "unknown")
    if text:
        msa.msa_3 = escaped(text)
    if code != "AA":
        err = ack.add_segment("ERR")
        err.err_3 = "207^Application internal error^HL70357"
        err.err_4 = "E"
        if text:
            err.err_8 = escaped(text)
    return ack.to_er7().encode(CODECS[charset])


def check_message(text: str) -> tuple[Any, list[str], list[str]]:
    """Parse and validate with hl7apy: (message, errors, warnings)."""
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    except Exception as error:
        return None, [f"{type(error).__name__}: {error}"], []
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.txt"
        try:
            message.validate(report_file=str(report))
            errors: list[str] = []
        except Exception as error:
            errors = [f"{type(error).__name__}: {error}"]
        lines = report.read_text().splitlines() if report.exists() else []
    warnings = [line for line in lines if line.startswith("Warning")]
    errors += [line for line in lines if line.startswith("Error")]
    return message, errors, warnings


@dataclass
class _State:
    script: list[str]
    received: list[Received] = field(default_factory=list)
    connections: int = 0


class MllpReceiver:
    def __init__(self, script: list[str] | tuple[str, ...] = (), *, default: str = "AA",
                 error_text: str = "Order not found", tls: Any = None,
                 one_message_per_connection: bool = False, port: int = 0,
                 ack_charset: str = ""):
        for action in (*script, default):
            assert action in ACTIONS, action
        self.default = default
        self.error_text = error_text
        self.ack_charset = ack_charset
        self.one_message_per_connection = one_message_per_connection
        self._state = _State(list(script))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server((LOCALHOST, port))
        self.port = self._server.getsockname()[1]
        self._context = None
        if tls is not None:  # the test CA's server certificate (tests.tls_material)
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    # --- what tests read ------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._state.received)

    def kept(self) -> dict[str, Received]:
        """The messages a RIS files: those answered AA, one per control ID."""
        kept: dict[str, Received] = {}
        for message in self.received:
            if message.action == "AA":
                kept.setdefault(message.control_id, message)
        return kept

    def wait_for(self, count: int, timeout: float = 60.0) -> bool:
        return wait_until(lambda: len(self.received) >= count, timeout)

    def destination(self, **extra: Any) -> dict[str, Any]:
        """A [[destinations]] block for pacs-ai that sends here."""
        return {"kind": "hl7", "name": "ris", "host": LOCALHOST, "port": self.port,
                "timeout_seconds": 5, **extra}

    # --- serving --------------------------------------------------------------------------

    def start(self) -> "MllpReceiver":
        self._accepter.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> "MllpReceiver":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._state.connections += 1
                number = self._state.connections
            thread = threading.Thread(target=self._serve, args=(connection, number), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        try:
            if self._context is not None:
                connection = self._context.wrap_socket(connection, server_side=True)
            connection.settimeout(0.5)
            buffer = b""
            while not self._stop.is_set():
                try:
                    chunk = connection.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                buffer += chunk
                while START_BLOCK in buffer and END_BLOCK in buffer:
                    start = buffer.index(START_BLOCK)
                    end = buffer.index(END_BLOCK, start)
                    payload, buffer = buffer[start + 1:end], buffer[end + 2:]
                    if not self._answer(connection, payload, number):
                        return
        except (OSError, ssl.SSLError):
            return
        finally:
            connection.close()

    def _answer(self, connection: socket.socket, payload: bytes, number: int) -> bool:
        """Record and answer one message; False when the connection is to be closed."""
        text, unreadable = decode(payload)
        message, errors, warnings = check_message(text)
        errors = unreadable + errors
        with self._lock:
            action = self._state.script.pop(0) if self._state.script else self.default
            self._state.received.append(Received(payload, text, message, errors, warnings,
                                                 action, number))
        if action == "close":
            return False
        if action == "none":  # hold the connection, answer nothing, until the sender leaves
            while not self._stop.is_set():
                try:
                    if not connection.recv(65536):
                        return False
                except socket.timeout:
                    continue
            return False
        ack = build_ack(text, action, self.error_text if action != "AA" else "",
                        self.ack_charset)
        connection.sendall(START_BLOCK + ack + END_BLOCK)
        return not self.one_message_per_connection
