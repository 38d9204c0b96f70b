"""CPU of the receiving thread per 10 MB film, read in 1 MiB PDUs over a local socket pair:
pynetdicom's own way (4 KiB per recv call) against pacs_ai.network.sockets.read_pdus_in_large_chunks.

    .venv/bin/python bench/pdu_reads.py
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

from pacs_ai.network.sockets import read_pdus_in_large_chunks

PDU_BYTES = 1 << 20
FILM_BYTES = 10_000_000
FILMS = 20


def pynetdicom_style_recv(sock: socket.socket, nr_bytes: int) -> bytearray:
    """What pynetdicom's AssociationSocket.recv does: at most 4096 bytes per call."""
    received = bytearray()
    while len(received) < nr_bytes:
        chunk = sock.recv(min(4096, nr_bytes - len(received)))
        if not chunk:
            break
        received.extend(chunk)
    return received


def cpu_ms_per_film(way: str) -> float:
    ours, peer = socket.socketpair()
    pdus = FILMS * FILM_BYTES // PDU_BYTES
    payload = b"x" * PDU_BYTES
    writer = threading.Thread(target=lambda: [peer.sendall(payload) for _ in range(pdus)])
    writer.start()
    if way == "pacs-ai":
        association = SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=ours)))
        read_pdus_in_large_chunks(association)
        recv = association.dul.socket.recv
    else:
        def recv(nr_bytes: int) -> bytearray:
            return pynetdicom_style_recv(ours, nr_bytes)
    started = time.thread_time()
    for _ in range(pdus):
        recv(PDU_BYTES)
    used = time.thread_time() - started
    writer.join()
    ours.close()
    peer.close()
    return used / FILMS * 1000


if __name__ == "__main__":
    for way in ("pynetdicom", "pacs-ai", "pynetdicom", "pacs-ai"):
        print(f"{way:10} {cpu_ms_per_film(way):5.1f} ms receiving-thread CPU per 10 MB film")
