"""`pacs-ai classify` over sample_dicoms/, run as a real subprocess with a tiny model file.

Every sample ends with its expected status (ok / skipped / error) and reason code from
manifest.json, as one JSON line, with no traceback, and the run goes on past broken files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.environment import REPO_ROOT, SAMPLE_DICOMS

MANIFEST = json.loads((SAMPLE_DICOMS / "manifest.json").read_text())["files"]


def classify(*arguments: str) -> tuple[int, list[dict], str]:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "pacs_ai", "classify", *arguments],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                            env=environment)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, lines, result.stderr


def by_file(results: list[dict]) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in results}


@pytest.fixture(scope="module")
def sample_results(tiny_model) -> tuple[int, dict[str, dict], str]:
    files = [str(SAMPLE_DICOMS / e["file"]) for e in MANIFEST]
    code, results, stderr = classify("--model", str(tiny_model), *files)
    return code, by_file(results), stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_each_sample_gets_its_expected_status_and_reason(entry, sample_results):
    _, results, _ = sample_results
    result = results[entry["file"]]
    assert result["status"] == entry["expected_status"], result
    if entry["expected_status"] == "ok":
        assert 0.0 <= result["probability"] <= 1.0
        assert result["finding"] is not None and "reason" not in result
    else:
        assert result["probability"] is None and result["finding"] is None
        code, _, detail = result["reason"].partition(": ")
        assert code == entry["expected_reason"], result["reason"]
        assert detail, "the reason says what was wrong"


@pytest.mark.timeout(300)
def test_the_run_finishes_cleanly_past_broken_files(sample_results):
    code, results, stderr = sample_results
    assert code == 0
    assert len(results) == len(MANIFEST)
    assert "Traceback" not in stderr


@pytest.mark.timeout(300)
def test_a_folder_gives_one_line_per_sample_and_passes_over_its_docs(tiny_model):
    code, results, stderr = classify("--model", str(tiny_model), str(SAMPLE_DICOMS))
    assert code == 0, stderr
    assert sorted(by_file(results)) == sorted(e["file"] for e in MANIFEST)


@pytest.mark.timeout(300)
def test_only_broken_input_exits_non_zero_with_reasons(tiny_model, tmp_path):
    broken = [str(SAMPLE_DICOMS / e["file"]) for e in MANIFEST if e["expected_status"] == "error"]
    missing = str(tmp_path / "no-such-file.dcm")
    code, results, stderr = classify("--model", str(tiny_model), *broken, missing)
    assert code == 1
    assert "nothing could be classified" in stderr and "Traceback" not in stderr
    assert by_file(results)["no-such-file.dcm"]["reason"].startswith("unreadable: ")


def test_a_folder_without_films_is_named(tiny_model, tmp_path):
    """An empty folder (or one of notes only): exit 1 saying there was no file, not that
    "nothing could be classified", which reads as films that failed."""
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "README.md").write_text("films go here\n")
    code, results, stderr = classify("--model", str(tiny_model), str(tmp_path / "exports"))
    assert code == 1 and results == []
    assert f"pacs-ai classify: no file to classify in {tmp_path / 'exports'}" in stderr
    assert "nothing could be classified" not in stderr


@pytest.mark.timeout(300)
def test_max_pixels_option_refuses_large_images(tiny_model):
    entry = next(e for e in MANIFEST if e["expected_status"] == "ok")
    code, results, _ = classify("--model", str(tiny_model), "--max-pixels", "1000",
                                str(SAMPLE_DICOMS / entry["file"]))
    assert code == 1
    assert results[0]["status"] == "error" and results[0]["reason"].startswith("too-large: ")


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_a_max_pixels_that_no_film_could_meet_is_a_usage_error(tiny_model, value):
    """--max-pixels 0 or -1 refused every film as too-large, exit 1, as if the films were at
    fault; now exit 2 naming the option, before any film is read."""
    entry = next(e for e in MANIFEST if e["expected_status"] == "ok")
    code, results, stderr = classify("--model", str(tiny_model), "--max-pixels", value,
                                     str(SAMPLE_DICOMS / entry["file"]))
    assert code == 2 and results == []
    assert "pacs-ai classify: error: argument --max-pixels: " in stderr
    assert "Traceback" not in stderr


def test_prepare_says_how_long_the_file_took_and_what_it_came_to(tmp_path):
    from pacs_ai.config import DEFAULT_MAX_PIXELS, FilterPolicy
    from pacs_ai.film.film_input import PrepareStatus, prepare

    prepared = prepare(SAMPLE_DICOMS / "cr_pneumonia_ap_12bit.dcm", FilterPolicy(),
                       DEFAULT_MAX_PIXELS)
    assert prepared.status is PrepareStatus.OK and 0 < prepared.seconds < 60
    missing = prepare(tmp_path / "none.dcm", FilterPolicy(), DEFAULT_MAX_PIXELS)
    assert missing.status is PrepareStatus.ERROR and missing.seconds > 0
    lateral = prepare(SAMPLE_DICOMS / "skip_dx_chest_lateral.dcm", FilterPolicy(), DEFAULT_MAX_PIXELS)
    assert lateral.status is PrepareStatus.SKIPPED and lateral.reason.startswith("not-frontal")
    assert [*PrepareStatus] == ["ok", "skipped", "error"]  # what `pacs-ai classify` prints


def test_stdout_holds_only_json_lines_when_the_service_logs(tmp_path):
    """A film whose Patient's Age cannot be read makes the age check log a note; the note goes
    to stderr (or nowhere), never among the JSON lines on stdout."""
    import pydicom

    dataset = pydicom.dcmread(SAMPLE_DICOMS / "cr_normal_pa_12bit.dcm")
    dataset.PatientAge = "54"  # no unit: malformed
    film = tmp_path / "malformed_age.dcm"
    dataset.save_as(film)
    from testbed.tiny_models import export_untrained_tiny_model

    children = export_untrained_tiny_model(tmp_path / "children.pt",
                                           intended_use={"age_years": [1, 5]})
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "pacs_ai", "classify", "--model",
                             str(children), str(film)], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT, env=environment)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert json.loads(lines[0])["status"] == "ok"
