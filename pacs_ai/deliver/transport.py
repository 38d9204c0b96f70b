"""What a destination's sender needs from the wire: open a connection, store report files,
close. C-STORE (pacs_ai.deliver.cstore_transport) and STOW-RS (pacs_ai.deliver.stow_transport) implement it;
pacs_ai.deliver.sender does the rest (which deliveries are due, retry and backoff, the queue, logs and
metrics), the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class StoreResult:
    """The outcome of storing one report."""

    stored: bool
    # stored: what the peer answered ("0x0000", "HTTP 200"); not stored: "code: detail",
    # the last_error a delivery row keeps
    detail: str
    permanent: bool = False  # a retry cannot help (an unreadable report, an HTTP 400)


class ConnectFailed(Exception):
    """The destination could not be reached; str() is the "code: detail" to record."""


# The codes of a failed attempt's "code: detail" that say the destination could not be reached
# (no connection, no association, no answer), rather than that it answered and refused: a
# working C-ECHO or delivery to it makes deliveries waiting on such an error due at once.
UNREACHABLE_CODES = ("connection-failed", "association-rejected", "association-aborted",
                     "association-lost", "no-answer", "timeout")


def unreachable(error: str | None) -> bool:
    """Whether a delivery's last error says its destination could not be reached (a TLS
    failure, "tls-...", included: a connection that works again has got past it)."""
    code = (error or "").split(":", 1)[0]
    return code in UNREACHABLE_CODES or code.startswith("tls-")


class Connection(Protocol):
    def is_open(self) -> bool:
        """False once the connection broke; the rest of the batch then fails with
        `lost_reason`."""

    @property
    def lost_reason(self) -> str:
        ...

    def store(self, path: Path) -> StoreResult:
        ...

    def close(self) -> None:
        ...


class Transport(Protocol):
    def connect(self) -> Connection:
        """A connection to send a batch over; raises ConnectFailed."""
