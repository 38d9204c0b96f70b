"""Run the real DICOM checkers on a dataset or file and return what they said, parsed.

- :func:`run_dciodvfy` runs dicom3tools ``dciodvfy`` (IOD/module/attribute validation).
- :func:`run_dsrdump` runs DCMTK ``dsrdump`` (reads an SR and prints its content tree; it
  complains about content-tree and encoding problems on stderr).

Both accept a ``pydicom.Dataset`` (written to a temporary file, which needs ``file_meta``) or a
path, skip the test outside CI when the tool is missing
(``testbed.environment.require_tool``) and so belong in tests marked
``@pytest.mark.real_peer``. Every run is bounded by a timeout.

Typical use::

    result = run_dciodvfy(sr)
    print(result.report())          # shows in pytest -s / -rA output
    assert result.errors == [], result.output
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset

from testbed.environment import require_tool

TOOL_TIMEOUT_S = 60

# dsrdump (DCMTK 3.6.7) prints this for every UTF-8 (ISO_IR 192) file, options or not: a limit
# of its VR checker, not a problem of the file. Tests on UTF-8 objects may expect exactly it.
DSRDUMP_NO_UTF8_VR_CHECK = (
    "W: The VR checker does not support this Specific Character Set: ISO_IR 192")


@dataclass
class ToolResult:
    """One run of a checker: its exit status, full output and the parsed problem lines."""

    tool: str
    returncode: int
    stdout: str
    stderr: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        """stdout and stderr together, for assertion messages."""
        return f"--- {self.tool} stdout ---\n{self.stdout}--- {self.tool} stderr ---\n{self.stderr}"

    def report(self) -> str:
        """A short human summary: counts, then each error and warning line."""
        lines = [f"{self.tool}: exit {self.returncode}, {len(self.errors)} error(s), "
                 f"{len(self.warnings)} warning(s)"]
        lines += [f"  {line}" for line in self.errors + self.warnings]
        return "\n".join(lines)


@contextmanager
def dicom_file(dataset_or_path: Dataset | str | Path) -> Iterator[Path]:
    """A path to the given file, or to a temporary Part 10 file holding the given dataset."""
    if not isinstance(dataset_or_path, Dataset):
        yield Path(dataset_or_path)
        return
    with tempfile.TemporaryDirectory(prefix="pacs-ai-check-") as folder:
        path = Path(folder) / "object.dcm"
        dataset_or_path.save_as(path, enforce_file_format=True)
        yield path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          timeout=TOOL_TIMEOUT_S, check=False)


def run_dciodvfy(dataset_or_path: Dataset | str | Path) -> ToolResult:
    """dicom3tools ``dciodvfy``: ``errors`` are its ``Error - ...`` lines, ``warnings`` its
    ``Warning - ...`` lines. Its exit status is 0 even when it finds errors, so test the lists.
    """
    tool = require_tool("dciodvfy")
    with dicom_file(dataset_or_path) as path:
        completed = _run([tool, str(path)])
    lines = (completed.stdout + "\n" + completed.stderr).splitlines()
    return ToolResult(
        tool="dciodvfy", returncode=completed.returncode,
        stdout=completed.stdout, stderr=completed.stderr,
        errors=[line.strip() for line in lines if line.lstrip().startswith("Error")],
        warnings=[line.strip() for line in lines if line.lstrip().startswith("Warning")],
    )


def run_dsrdump(dataset_or_path: Dataset | str | Path,
                options: tuple[str, ...] = ("+Pc", "+Pu", "+Pt")) -> ToolResult:
    """DCMTK ``dsrdump``: the content tree on ``stdout``; ``errors`` are its ``E:``/``F:``
    log lines, ``warnings`` its ``W:`` lines (content-tree, VR and IOD complaints).

    The default options print every concept name code (``+Pc``), referenced SOP Instance UIDs
    (``+Pu``) and template identifiers (``+Pt``), so tests can assert on the dumped tree.
    A non-zero exit status means dsrdump could not read the document.
    """
    tool = require_tool("dsrdump")
    with dicom_file(dataset_or_path) as path:
        completed = _run([tool, *options, str(path)])
    lines = completed.stderr.splitlines()
    return ToolResult(
        tool="dsrdump", returncode=completed.returncode,
        stdout=completed.stdout, stderr=completed.stderr,
        errors=[line.strip() for line in lines if line.startswith(("E:", "F:"))],
        warnings=[line.strip() for line in lines if line.startswith("W:")],
    )
