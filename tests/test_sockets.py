"""The listener's socket tweaks, on real socket pairs (the full path is in test_listener)."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from pacs_ai.network.sockets import read_pdus_in_large_chunks


def association_over(sock: socket.socket) -> SimpleNamespace:
    """The attribute path pynetdicom gives an association: assoc.dul.socket.socket."""
    transport = SimpleNamespace(socket=sock, recv=None)
    return SimpleNamespace(dul=SimpleNamespace(socket=transport))


@pytest.fixture
def pair():
    ours, peer = socket.socketpair()
    ours.settimeout(5)
    yield ours, peer
    ours.close()
    peer.close()


def test_reads_exactly_the_bytes_asked_for_across_many_writes(pair):
    ours, peer = pair
    association = association_over(ours)
    read_pdus_in_large_chunks(association)
    payload = bytes(range(256)) * 40_000  # 10 MB, more than one socket buffer
    writer = threading.Thread(target=lambda: [peer.sendall(payload[i:i + 70_001])
                                              for i in range(0, len(payload), 70_001)])
    writer.start()
    first = association.dul.socket.recv(6)
    rest = association.dul.socket.recv(len(payload) - 6)
    writer.join(timeout=10)
    assert isinstance(first, bytearray) and isinstance(rest, bytearray)
    assert first + rest == payload


def test_a_closed_connection_returns_what_arrived(pair):
    ours, peer = pair
    association = association_over(ours)
    read_pdus_in_large_chunks(association)
    peer.sendall(b"abc")
    peer.shutdown(socket.SHUT_WR)
    assert association.dul.socket.recv(10) == bytearray(b"abc")
    assert association.dul.socket.recv(10) == bytearray()


def test_a_silent_peer_times_out_as_before(pair):
    ours, _ = pair
    ours.settimeout(0.2)
    association = association_over(ours)
    read_pdus_in_large_chunks(association)
    with pytest.raises(TimeoutError):
        association.dul.socket.recv(4)


def test_an_association_without_a_socket_is_left_alone():
    association = SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=None)))
    read_pdus_in_large_chunks(association)
    assert not hasattr(association.dul.socket, "recv")


def test_a_huge_announced_length_allocates_only_what_arrives(pair):
    """A hostile peer's PDU header may announce 4 GB; memory must follow the bytes received."""
    import tracemalloc

    ours, peer = pair
    association = association_over(ours)
    read_pdus_in_large_chunks(association)
    peer.sendall(b"x" * 1000)
    peer.shutdown(socket.SHUT_WR)
    tracemalloc.start()
    try:
        received = association.dul.socket.recv(0xFFFFFFFF)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == bytearray(b"x" * 1000)
    assert peak < 4 * 1024 * 1024
