"""The repository's paths, ../shared/data and external tools, for tests and benchmarks.

What a test needs that this machine lacks (an external tool, ../shared/data) is skipped with a
reason on a developer machine and FAILS in CI (CI=true): nothing of that may be skipped there.
Kept out of tests/conftest.py so that nobody imports conftest (pytest imports it under its own
name, and a second import would make a second copy).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PACS_AI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SAMPLE_DICOMS = REPO_ROOT / "sample_dicoms"
# PYTHONPATH for a service run under tests/fault_hooks: the hooks import pacs_ai at start-up,
# before the service's folder is on the path, so this tree comes next (else an editable install
# of another checkout would be the service tested)
FAULT_HOOKS_PYTHONPATH = os.pathsep.join([str(REPO_ROOT / "tests" / "fault_hooks"),
                                          str(REPO_ROOT)])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip outside CI; fail in CI, where every real-peer and data test must run."""
    if in_ci():
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of an external program, or skip/fail as above."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} not installed (apt-get install dcmtk dicom3tools orthanc)")
    return path
