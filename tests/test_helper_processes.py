"""The helper process: a crash is pinned on the one image that caused it, even when the
worker has the next batch in flight (tests/fault_hooks injects a SIGSEGV into the helper)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pacs_ai.config import DEFAULT_MAX_PIXELS, FilterPolicy
from pacs_ai.helper_processes import HelperPool
from testbed.dicom_peers import synthetic_radiograph

FAULT_HOOKS = Path(__file__).resolve().parent / "fault_hooks"


@pytest.fixture
def crashing_work(monkeypatch, tmp_path):
    """HelperPool whose helper dies on any image containing the returned marker."""
    marker = f"CRASH-THE-DECODER-{generate_uid()}"
    monkeypatch.setenv("PACS_AI_FAULT_CRASH_MARKER", marker)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(FAULT_HOOKS), os.environ.get("PYTHONPATH", "")]))
    work = HelperPool(1)
    yield work, marker
    work.close()


def films(folder: Path, names: list[str], marker: str) -> list[Path]:
    paths = []
    for index, name in enumerate(names):
        dataset = synthetic_radiograph(seed=300 + index, rows=128, columns=96)
        if name.startswith("crash"):
            dataset.ImageComments = marker
        path = folder / f"{name}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def prepare(work: HelperPool, paths: list[Path]):
    return work.start_prepare(paths, FilterPolicy(), DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize("crash_in", ["current", "ahead"])
def test_a_crash_fails_only_its_image_with_a_second_batch_in_flight(crashing_work, tmp_path,
                                                                    crash_in):
    work, marker = crashing_work
    current_names = ["crash-a", "a2"] if crash_in == "current" else ["a1", "a2"]
    ahead_names = ["b1", "crash-b"] if crash_in == "ahead" else ["b1", "b2"]
    current = prepare(work, films(tmp_path, current_names, marker))
    ahead = prepare(work, films(tmp_path, ahead_names, marker))  # queued behind, as the worker does

    outcomes = {}
    for pending, names in ((current, current_names), (ahead, ahead_names)):
        for name, item in zip(names, pending.results()):
            outcomes[name] = item.status if item.status == "ok" else item.reason.split(":")[0]
    expected = {name: "decode-crashed" if name.startswith("crash") else "ok"
                for name in current_names + ahead_names}
    assert outcomes == expected
    assert work._generation == 2  # the pool broke twice: once batched, once when isolated
    # and the new helper keeps working
    (after,) = prepare(work, films(tmp_path, ["after"], marker)).results()
    assert after.status == "ok"


def test_an_empty_batch_does_not_restart_the_helper(crashing_work):
    work, _ = crashing_work
    assert work.start_prepare([], FilterPolicy(), DEFAULT_MAX_PIXELS).results() == []
    assert work._generation == 0


def test_every_helper_is_started_single_threaded_before_the_first_image():
    """All helpers run (and have imported) before any film, not one by one during the first
    burst; each inherits single-threaded native libraries, and the service's own environment is
    left as it was."""
    before = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    work = HelperPool(3)
    try:
        assert len(multiprocessing.active_children()) >= 3
        pids = {work._submit(os.getpid, ())[0].result(timeout=30) for _ in range(12)}
        assert len(pids) <= 3  # no helper beyond the three started up front
        settings = {work._submit(os.getenv, ("OPENBLAS_NUM_THREADS",))[0].result(timeout=30)
                    for _ in range(6)}
        assert settings == {before["OPENBLAS_NUM_THREADS"] or "1"}
        assert {name: os.environ.get(name) for name in before} == before
    finally:
        work.close()
