"""Shared test policy.

Tests that need an external tool (DCMTK, dicom3tools, Orthanc) or ../shared/data skip with a
reason on a developer machine that lacks them, and FAIL in CI (CI=true): nothing of that may be
skipped there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PACS_AI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SAMPLE_DICOMS = REPO_ROOT / "sample_dicoms"


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The untrained tiny model exported once per session through the real model contract
    (training.export): for every test that needs a model file but not trained answers."""
    from training.export import export_untrained_tiny_model

    return export_untrained_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (the chest X-ray folders), or skip/fail as above."""
    if not (SHARED_DATA / "chest_xray" / "train").is_dir():
        skip_or_fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI, a skip of a real-peer or shared-data test is turned into a failure."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and (
            item.get_closest_marker("real_peer") or item.get_closest_marker("shared_data")):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which is not allowed for this test: {report.longrepr}"
