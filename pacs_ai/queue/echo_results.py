"""The latest C-ECHO result per destination, kept in the spool (`<spool>/destination-echo.json`).

`pacs_ai.deliver.destination_echo` writes it; the delivery health (`pacs_ai.ops.health`, for /healthz, the
queue page and `pacs-ai status` in another process) reads it. A module of its own, so that
reading the health does not import the echo thread and the DICOM sender behind it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS_FILE = "destination-echo.json"


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    at: float  # Unix time of the echo
    detail: str  # "0x0000", or why it failed
    milliseconds: float
    failing_since: float | None  # the first failed echo since the last ok one


class EchoResults:
    """The latest echo result per destination, in a small JSON file in the spool."""

    def __init__(self, spool_root: Path):
        self.path = Path(spool_root) / RESULTS_FILE
        self._lock = threading.Lock()

    def update(self, name: str, result: EchoResult) -> None:
        with self._lock:
            results = load_results(self.path.parent)
            results[name] = asdict(result)
            staged = self.path.with_suffix(".tmp")
            staged.write_text(json.dumps(results, indent=1, sort_keys=True))
            os.replace(staged, self.path)  # readers see the old file or the new one, whole


def load_results(spool_root: Path) -> dict[str, dict[str, Any]]:
    """Destination name -> its latest echo result as written by EchoResults ({} if none)."""
    try:
        data = json.loads((Path(spool_root) / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
