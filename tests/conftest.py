"""Shared test policy and fixtures.

Tests that need an external tool (DCMTK, dicom3tools, Orthanc) or ../shared/data skip with a
reason on a developer machine that lacks them, and FAIL in CI (CI=true): nothing of that may be
skipped there. The paths and the policy live in testbed.environment (import them from there,
never from this file, which pytest imports under its own name).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.environment import SHARED_DATA, in_ci, skip_or_fail


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The untrained tiny model exported once per session through the real model contract
    (training.export): for every test that needs a model file but not trained answers."""
    from testbed.tiny_models import export_untrained_tiny_model

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
