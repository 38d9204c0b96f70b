"""The helper process: a crash is pinned on the one image that caused it, even when the
worker has the next batch in flight (tests/fault_hooks injects a SIGSEGV into the helper); a
film is read once, and its report and heat map made from what prepare kept are those made from
the file; a batch goes to a helper in one message."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_ai.classify.helper_processes import HelperPool, prepare_image, render_report
from pacs_ai.config import DEFAULT_MAX_PIXELS, FilterPolicy
from pacs_ai.model import heatmap
from testbed.dicom_peers import synthetic_radiograph
from testbed.environment import SAMPLE_DICOMS
from tests.test_report import MODEL

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


# --- one read and one decode per film (issue 25 item 2) -----------------------------------------

SAMPLES = json.loads((SAMPLE_DICOMS / "manifest.json").read_text())["files"]
REPORTED_SAMPLES = [SAMPLE_DICOMS / e["file"] for e in SAMPLES if e["expected_status"] == "ok"]
CLOCK_READINGS = {"InstanceCreationDate": "20000101", "ContentDate": "20000101",
                  "InstanceCreationTime": "000000", "ContentTime": "000000",
                  "ContributionDateTime": "20000101000000",
                  "DateOfSecondaryCapture": "20000101", "TimeOfSecondaryCapture": "000000"}


def without_clock(data: bytes) -> bytes:
    """An encoded object's bytes with its build's clock readings set to one fixed instant."""
    dataset = pydicom.dcmread(io.BytesIO(data))

    def pin(_, element) -> None:
        if element.keyword in CLOCK_READINGS:
            element.value = CLOCK_READINGS[element.keyword]

    dataset.walk(pin)
    encoded = io.BytesIO()
    dataset.save_as(encoded, enforce_file_format=True)
    return encoded.getvalue()


def hot_grid() -> np.ndarray:
    grid = np.zeros((12, 12), np.float32)
    grid[4:8, 2:6] = 1.0
    grid[5, 3] = 2.0
    return heatmap.normalised(grid)


def kept_of(path: Path, heatmap_wanted: bool = True):
    prepared = prepare_image(path, FilterPolicy(), DEFAULT_MAX_PIXELS, True, heatmap_wanted)
    assert prepared.status == "ok", prepared.reason
    return prepared.kept


@pytest.mark.parametrize("path", REPORTED_SAMPLES, ids=[p.name for p in REPORTED_SAMPLES])
def test_the_report_and_heat_map_from_what_prepare_kept_are_those_read_from_the_file(path):
    """Every transfer syntax: the SR and the heat-map image made from the header and picture
    kept at prepare are byte for byte those made by reading the file again, as before."""
    kept = kept_of(path)
    assert kept.heatmap_film is not None  # every sample's picture comes from its one decode
    assert kept_of(path, heatmap_wanted=False).heatmap_film is None  # heat maps off: no picture
    grid = hot_grid()
    from_kept = render_report(path, 0.9, MODEL, "comprehensive3d", grid, True, kept=kept)
    from_file = render_report(path, 0.9, MODEL, "comprehensive3d", grid, True)
    for result in (from_kept, from_file):
        assert result.error is None and result.heatmap_error is None, result
    assert without_clock(from_kept.data) == without_clock(from_file.data)
    assert without_clock(from_kept.heatmap_data) == without_clock(from_file.heatmap_data)
    normal = render_report(path, 0.1, MODEL, "comprehensive", None, False, kept=kept)
    assert without_clock(normal.data) == without_clock(
        render_report(path, 0.1, MODEL, "comprehensive").data)


def test_after_prepare_the_report_is_made_without_the_file(tmp_path):
    """The film is read once: with the file gone after prepare, a normal film's SR and the SR
    and heat map of films stored uncompressed, deflated and JPEG 2000 are still made."""
    names = ["cr_normal_pa_12bit.dcm", "cr_pneumonia_ap_16bit_signed_j2k_lossless.dcm",
             "cr_pneumonia_pa_12bit_mono1.dcm", "cr_pneumonia_pa_12bit_deflated.dcm"]
    kept = {}
    for name in names:
        copied = tmp_path / name
        shutil.copyfile(SAMPLE_DICOMS / name, copied)
        kept[name] = kept_of(copied)
        copied.unlink()
    normal = render_report(tmp_path / names[0], 0.1, MODEL, "comprehensive3d", None, False,
                           kept=kept[names[0]])
    assert normal.error is None and normal.data
    for name in names[1:]:
        reported = render_report(tmp_path / name, 0.9, MODEL, "comprehensive3d", hot_grid(),
                                 True, kept=kept[name])
        assert reported.error is None and reported.heatmap_error is None, name
        assert reported.data and reported.heatmap_data


def test_a_picture_the_models_decode_cannot_serve_is_drawn_from_the_file(tmp_path):
    """A 2500 x 2048 JPEG 2000 film: decoded at level 2 for the model input, level 1 for the
    picture, so nothing is kept for the heat map and it is drawn from the file, as before;
    without the file, the report still goes, without the heat map and saying why."""
    from pydicom.uid import JPEG2000Lossless

    from tests.test_pixels_reduced import synthetic_film

    path = tmp_path / "large-j2k.dcm"
    synthetic_film("2500x2048-12bit", JPEG2000Lossless).save_as(path, enforce_file_format=True)
    kept = kept_of(path)
    assert kept.header is not None and kept.heatmap_film is None
    grid = hot_grid()
    from_kept = render_report(path, 0.9, MODEL, "comprehensive3d", grid, True, kept=kept)
    from_file = render_report(path, 0.9, MODEL, "comprehensive3d", grid, True)
    assert without_clock(from_kept.heatmap_data) == without_clock(from_file.heatmap_data)
    path.unlink()
    gone = render_report(path, 0.9, MODEL, "comprehensive3d", grid, True, kept=kept)
    assert gone.error is None and gone.data and gone.heatmap_data is None
    assert gone.heatmap_error.startswith("heatmap-failed: FileNotFoundError")


def test_a_film_without_what_a_report_needs_fails_its_report_as_before(tmp_path):
    dataset = synthetic_radiograph(seed=7, rows=128, columns=96)
    del dataset.SeriesInstanceUID
    path = tmp_path / "no-series.dcm"
    dataset.save_as(path, enforce_file_format=True)
    kept = kept_of(path)
    assert kept.header is None
    from_kept = render_report(path, 0.9, MODEL, "comprehensive3d", kept=kept)
    from_file = render_report(path, 0.9, MODEL, "comprehensive3d")
    assert from_kept.error == from_file.error == \
        "report-failed: source dataset lacks SeriesInstanceUID"


def test_a_batchs_films_go_to_a_helper_for_prepare_in_one_message_each_way(tmp_path):
    work = HelperPool(1)
    try:
        pending = prepare(work, films(tmp_path, ["a", "b", "c", "d"], "unused"))
        assert len(pending._futures) == 1  # four films, one call to the one helper
        assert [item.status for item in pending.results()] == ["ok"] * 4
    finally:
        work.close()
