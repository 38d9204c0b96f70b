"""Every use of pynetdicom's undocumented internals, behind one door.

pynetdicom has no public way to reach an association's socket, read its PDUs differently,
watch a DIMSE message while it arrives, or wake an acceptor waiting for its A-ASSOCIATE-RQ;
the listener and the sender need each (docs/architecture.md, "Library internals we rely on, and
why", says what for). Each function here is one such use, so an upgrade has one file to read,
and tests/test_pynetdicom_internals.py fails when the pinned pynetdicom (pyproject.toml) no
longer has what they touch. Everything else goes through pynetdicom's public API (the
listener's server is an `AssociationServer` subclass passed to `AE.make_server`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from pynetdicom import _config


def transport(association: Any) -> Any | None:
    """The association's `AssociationSocket` (`association.dul.socket`), or None before it has
    one."""
    return getattr(getattr(association, "dul", None), "socket", None)


def os_socket(association: Any) -> socket.socket | None:
    """The OS (or TLS) socket under the association (`AssociationSocket.socket`), or None."""
    return getattr(transport(association), "socket", None)


def replace_pdu_reader(association: Any, recv: Callable[[int], bytearray]) -> bool:
    """Make the association's DUL read its PDUs through `recv(nr_bytes)` instead of
    `AssociationSocket.recv` (which the DUL calls for each PDU's 6-byte header, then for its
    body; same contract: `nr_bytes` bytes, fewer when the peer closed). This association only.
    False when it has no socket yet."""
    association_socket = transport(association)
    if association_socket is None or getattr(association_socket, "socket", None) is None:
        return False
    association_socket.recv = recv
    return True


def after_each_received_fragment(association: Any, check: Callable[[], None]) -> bool:
    """Call `check()` after each P-DATA the association's DIMSE provider takes in (wrapping
    `dimse.receive_primitive`, which the DUL thread calls per P-DATA). False without one."""
    dimse = getattr(association, "dimse", None)
    if dimse is None:
        return False
    receive = dimse.receive_primitive

    def receive_then_check(primitive: Any) -> None:
        receive(primitive)
        check()

    dimse.receive_primitive = receive_then_check
    return True


def message_in_progress(association: Any) -> tuple[Any, int] | None:
    """The DIMSE message the association is still gathering and its bytes so far (command and
    dataset), or None when none is (a complete one has been handed on)."""
    message = association.dimse.message
    if message is None:
        return None
    return message, message.encoded_command_set.tell() + message.data_set.tell()


def drop_message_in_progress(association: Any) -> None:
    """Forget the partial DIMSE message (and its memory)."""
    association.dimse.message = None


def end_acceptor_wait(association: Any) -> None:
    """Wake an acceptor association thread waiting for its A-ASSOCIATE-RQ: `None` on its DUL's
    `to_user_queue` reads as the ACSE timeout, so the thread kills its DUL, closes the socket
    and ends."""
    dul = getattr(association, "dul", None)
    if dul is not None:
        dul.to_user_queue.put(None)


def register_server(ae: Any, server: Any) -> None:
    """Add a server made with `AE.make_server` to the AE's list (`ae._servers`), as
    `AE.start_server` does: the server's `shutdown()` removes itself from that list and fails
    when it is not there."""
    ae._servers.append(server)


def send_datasets_from_file_in_chunks() -> None:
    """C-STORE requests built from a file are sent straight from the file in chunks, not read
    whole into memory first (`_config.STORE_SEND_CHUNKED_DATASET`, a process-wide setting)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
