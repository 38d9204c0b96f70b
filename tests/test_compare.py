"""`pacs-ai compare` (issue 24 item 2): the figures on results whose counts are known by
construction, the labels files it takes, the pair it chooses, and the command on a queue the
worker and the shadow filled with real model files. The command against what `pacs-ai serve`
recorded behind storescu and Orthanc is in tests/test_shadow.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pacs_ai.errors import UserError
from pacs_ai.evaluate.comparison import compare, parse_since, read_labels
from pacs_ai.queue.shadow_records import Assessment, ShadowResult
from testbed.environment import REPO_ROOT

pytestmark = pytest.mark.timeout(300)


def result(job_id: int, live: tuple, shadow: tuple, *, shadow_sha: str = "s" * 64,
           live_sha: str = "l" * 64, status: str = "assessed", at: float = 1000.0,
           uid: str | None = None) -> ShadowResult:
    """live/shadow: (probability, outcome) with outcome pneumonia, normal or abstained."""
    def assessment(probability: float, outcome: str) -> Assessment:
        abstained = outcome == "abstained"
        return Assessment(probability, 9.0 if abstained else 1.0, abstained,
                          None if abstained else outcome)
    return ShadowResult(
        job_id=job_id, model_name="candidate", model_version="2.0", model_sha256=shadow_sha,
        threshold=0.5, status=status,
        shadow=assessment(*shadow) if status == "assessed" else Assessment(None, None, None,
                                                                             None),
        live_model_name="live", live_model_version="1.0", live_model_sha256=live_sha,
        live_threshold=0.4, live=assessment(*live), reason=None, assessed_at=at,
        sop_instance_uid=uid or f"1.2.3.{job_id}", accession_number=f"A{job_id}",
        received_at=at)


# ten films: 5 agree, 2 normal -> pneumonia, 1 pneumonia -> normal, 1 reported -> abstained,
# 1 abstained -> reported; and one the shadow missed (busy)
FILMS = [
    result(1, (0.9, "pneumonia"), (0.8, "pneumonia")),
    result(2, (0.1, "normal"), (0.2, "normal")),
    result(3, (0.2, "normal"), (0.1, "normal")),
    result(4, (0.3, "normal"), (0.3, "normal")),
    result(5, (0.7, "pneumonia"), (0.9, "pneumonia")),
    result(6, (0.35, "normal"), (0.6, "pneumonia")),
    result(7, (0.2, "normal"), (0.55, "pneumonia")),
    result(8, (0.6, "pneumonia"), (0.4, "normal")),
    result(9, (0.5, "pneumonia"), (0.5, "abstained")),
    result(10, (0.3, "abstained"), (0.2, "normal")),
    result(11, (0.3, "normal"), (None, "-"), status="busy"),
]


def test_the_figures_over_the_films_both_assessed():
    summary, rows = compare(FILMS)
    assert summary["films"] == 10 and len(rows) == 10
    assert summary["not_assessed"] == {"busy": 1}
    assert summary["agreement"] == 0.5
    assert summary["flips"] == {"normal_to_pneumonia": 2, "pneumonia_to_normal": 1}
    assert summary["abstention_changes"] == {"reported_to_abstained": 1,
                                             "abstained_to_reported": 1}
    live, shadow = summary["rates"]["live"], summary["rates"]["shadow"]
    # live: pneumonia 1, 5, 8, 9 of the 9 it reported on; abstained on 1 of 10
    assert (live["pneumonia"], live["normal"], live["abstained"]) == (4, 5, 1)
    assert live["positive_rate"] == 4 / 9 and live["abstention_rate"] == 0.1
    # shadow: pneumonia 1, 5, 6, 7 of 9; abstained on film 9
    assert (shadow["pneumonia"], shadow["normal"], shadow["abstained"]) == (4, 5, 1)
    assert shadow["positive_rate"] == 4 / 9 and shadow["abstention_rate"] == 0.1
    counts = summary["outcomes"]["counts"]
    assert counts["normal"]["pneumonia"] == 2 and counts["abstained"]["normal"] == 1
    assert sum(sum(row.values()) for row in counts.values()) == 10
    assert summary["live"]["thresholds"] == [0.4] and summary["shadow"]["thresholds"] == [0.5]
    assert summary["labels"] is None and summary["other_pairs"] == []


def test_one_pair_is_compared_and_the_others_listed():
    older = [result(20 + i, (0.2, "normal"), (0.9, "pneumonia"), shadow_sha="o" * 64, at=10.0)
             for i in range(3)]
    summary, _ = compare(FILMS + older)  # no config: the pair with the latest result
    assert summary["films"] == 10 and summary["shadow"]["sha256"] == "s" * 64
    [other] = summary["other_pairs"]
    assert other["films"] == 3 and other["shadow_sha256"] == "o" * 64
    # the config's shadow file is compared even when another pair is newer
    summary, _ = compare(FILMS + older, shadow_sha256="o" * 64)
    assert summary["films"] == 3 and summary["flips"]["normal_to_pneumonia"] == 3


def test_no_results_compare_nothing():
    summary, rows = compare([])
    assert summary["films"] == 0 and rows == [] and summary["live"] is None


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_labels_by_uid_or_accession_number(tmp_path):
    labels = read_labels(write_csv(tmp_path / "uids.csv", [
        ["sop_instance_uid", "label"], *[[f"1.2.3.{i}", "pneumonia"] for i in (1, 5, 8, 6)],
        *[[f"1.2.3.{i}", "normal"] for i in (2, 3, 4, 7, 9, 10)]]))
    summary, rows = compare(FILMS, labels=labels)
    figures = summary["labels"]
    assert (figures["films"], figures["normal"], figures["pneumonia"]) == (10, 6, 4)
    # live at 0.4, films it reported on: pneumonia 1, 5, 6 (0.35: missed), 8 -> sens 3/4;
    # normals 2, 3, 4, 7 below 0.4, 9 (0.5) called: spec 4/5 (10 abstained)
    live = figures["live"]
    assert live["reported"]["sensitivity"] == 0.75 and live["reported"]["specificity"] == 0.8
    assert live["abstained"] == 1
    # over all labelled films, the abstained normal film 10 counts as not cleared: 4/6
    assert live["all_films"]["specificity"] == pytest.approx(4 / 6)
    # shadow at 0.5: pneumonias 1, 5, 6 found, 8 (0.4) missed; normals 2, 3, 4, 10 cleared,
    # 7 (0.55) called, 9 abstained
    shadow = figures["shadow"]
    assert shadow["reported"]["sensitivity"] == 0.75 and shadow["reported"]["specificity"] == 0.8
    assert {row["label"] for row in rows} == {"normal", "pneumonia"}
    by_accession = read_labels(write_csv(tmp_path / "accessions.csv", [
        ["accession_number", "label"], ["A1", "pneumonia"], ["A2", "0"]]))
    summary, _ = compare(FILMS, labels=by_accession)
    assert (summary["labels"]["films"], summary["labels"]["live"]["computed"]) == (2, True)


def test_labels_of_dicom_files_as_pacs_ai_evaluate_takes_them(tmp_path):
    from testbed.dicom_peers import synthetic_radiograph

    uids = {}
    for name, label in (("a.dcm", "pneumonia"), ("b.dcm", "normal")):
        dataset = synthetic_radiograph(seed=len(uids))
        dataset.save_as(tmp_path / name, enforce_file_format=True)
        uids[str(dataset.SOPInstanceUID)] = label
    (tmp_path / "c.png").write_bytes(b"\x89PNG not really")
    labels = read_labels(write_csv(tmp_path / "labels.csv", [
        ["path", "label"], ["a.dcm", "pneumonia"], ["b.dcm", "normal"], ["c.png", "normal"]]))
    assert {uid: ("normal", "pneumonia")[label] for uid, label in labels.by_uid.items()} == uids
    [note] = labels.notes
    assert "1 listed file(s) have no readable SOP Instance UID" in note


@pytest.mark.parametrize("rows, message", [
    ([["sop_instance_uid", "label"], ["1.2.3", "maybe"]], "line 2: expected a sop_instance_uid"),
    ([["sop_instance_uid", "label"], ["1.2.3", "normal"], ["1.2.3", "pneumonia"]],
     "labelled both ways"),
    ([["sop_instance_uid", "finding"], ["1.2.3", "normal"]], "no label column"),
    ([["path", "label"], ["missing.dcm", "normal"]], "file not found"),
])
def test_unusable_labels_are_named(tmp_path, rows, message):
    with pytest.raises(UserError) as error:
        read_labels(write_csv(tmp_path / "labels.csv", rows))
    assert message in str(error.value)


def test_since_takes_a_date_or_a_moment():
    midnight = parse_since("2026-12-01")
    assert time.localtime(midnight)[:6] == (2026, 12, 1, 0, 0, 0)
    assert parse_since("2026-12-01T08:30") - midnight == 8.5 * 3600
    with pytest.raises(UserError, match="--since"):
        parse_since("last week")
    with pytest.raises(UserError, match="--since"):
        parse_since("")
    # a well-formed date the local clock cannot place: a one-line error, not a traceback
    with pytest.raises(UserError, match="--since '0001-01-01': out of range"):
        parse_since("0001-01-01")


# --- the command on a queue the worker and the shadow filled ------------------------------------

def pacs_ai(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacs_ai", *arguments], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


def test_the_command_on_what_the_shadow_recorded(tmp_path, tiny_model):
    """The tiny model live and a tiny ensemble in shadow over five films in a real queue; the
    command's JSON and files agree with the rows the queue holds."""
    from pacs_ai.classify.shadow import ShadowRunner
    from pacs_ai.model.model import PneumoniaModel
    from testbed.dicom_peers import wait_until
    from testbed.tiny_models import export_untrained_tiny_ensemble
    from tests.test_shadow import worker_with_shadow
    from tests.test_worker import received_backlog

    candidate = export_untrained_tiny_ensemble(tmp_path / "candidate.pt", ood_threshold=1e9)
    spool, store = received_backlog(tmp_path, 5)
    live = PneumoniaModel.load(tiny_model)
    shadow = ShadowRunner(PneumoniaModel.load(candidate), live, store)
    stop = threading.Event()
    worker = worker_with_shadow(spool, store, live, shadow, stop)
    shadow.start()
    worker.start()
    assert wait_until(lambda: len(store.shadow_results()) == 5, 120)
    stop.set()
    worker.join(timeout=30)
    shadow.finish()
    shadow.join(timeout=30)
    recorded = store.shadow_results()
    store.close()

    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[storage]\nspool_dir = "{spool.root}"\n[model]\npath = "{tiny_model}"\n'
                      f'[shadow]\nmodel = "{candidate}"\n')
    out = tmp_path / "compared"
    result = pacs_ai("compare", "--config", str(config), "--json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["films"] == 5 and summary["not_assessed"] == {}
    assert (summary["live"]["name"], summary["shadow"]["name"]) == ("tiny-test-model",
                                                                    "tiny-test-ensemble")
    same = sum(r.live.finding == r.shadow.finding for r in recorded)
    assert summary["agreement"] == same / 5
    assert summary["flips"]["normal_to_pneumonia"] == sum(
        r.live.finding == "normal" and r.shadow.finding == "pneumonia" for r in recorded)
    with (out / "films.csv").open() as handle:
        films = list(csv.DictReader(handle))
    assert sorted(row["sop_instance_uid"] for row in films) == \
        sorted(r.sop_instance_uid for r in recorded)
    assert {float(row["shadow_probability"]) for row in films} == \
        {r.shadow.probability for r in recorded}
    svg = (out / "scatter.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") >= 5
    html = (out / "report.html").read_text()
    assert "tiny-test-ensemble" in html and "<svg" in html and "Agreement" in html
    # the text summary, and a period without films: exit 1 with the reason
    text = pacs_ai("compare", "--config", str(config), "--out", str(tmp_path / "text"))
    assert text.returncode == 0 and "films:      5 assessed by both" in text.stdout
    future = pacs_ai("compare", "--config", str(config), "--since", "2999-01-01",
                     "--out", str(tmp_path / "none"))
    assert future.returncode == 1
    assert "no film assessed by both models received since 2999-01-01" in future.stderr
    # usage errors: exit 2, one line
    bad = pacs_ai("compare", "--config", str(config), "--since", "soon")
    assert bad.returncode == 2 and "pacs-ai compare: error: --since 'soon'" in bad.stderr
    no_queue = tmp_path / "empty.toml"
    no_queue.write_text(f'[storage]\nspool_dir = "{tmp_path / "nothing"}"\n')
    missing = pacs_ai("compare", "--config", str(no_queue))
    assert missing.returncode == 2 and "no job queue" in missing.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = pacs_ai("compare", "--config", str(config), "--out", str(blocker / "out"))
    assert unwritable.returncode == 2
    assert f"error: --out {blocker / 'out'}: {blocker} is not a folder" in unwritable.stderr
    # a labels CSV named as a report file in --out is refused, not overwritten by the report
    trial = tmp_path / "trial"
    trial.mkdir()
    (trial / "films.csv").write_text("sop_instance_uid,label\n" + "".join(
        f"{r.sop_instance_uid},normal\n" for r in recorded))
    labels_text = (trial / "films.csv").read_text()
    clash = pacs_ai("compare", "--config", str(config), "--labels", str(trial / "films.csv"),
                    "--out", str(trial))
    assert clash.returncode == 2, clash.stdout
    assert f"its films.csv would overwrite {trial / 'films.csv'}" in clash.stderr
    assert (trial / "films.csv").read_text() == labels_text
    empty_since = pacs_ai("compare", "--config", str(config), "--since", "")
    assert empty_since.returncode == 2 and "--since ''" in empty_since.stderr
    assert "Traceback" not in (bad.stderr + missing.stderr + future.stderr + unwritable.stderr
                               + empty_since.stderr + clash.stderr)


def test_films_outside_the_shadows_age_range_are_counted_apart_not_compared(tmp_path):
    """A shadow for 1-5 years beside a live model for 0-10 (tests/test_shadow.py's aged models:
    every film both assess is a normal -> pneumonia flip): the two films outside 1-5 show as
    outside-intended-age in the JSON, the text and report.html, and are in no figure: not in
    the films, the agreement, the flips, the rates, the labelled films or films.csv."""
    from tests.test_shadow import run_aged_backlog

    spool, store, live_path, shadow_path = run_aged_backlog(tmp_path)
    recorded = store.shadow_results()
    store.close()
    assert len(recorded) == 5
    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[storage]\nspool_dir = "{spool.root}"\n[model]\npath = "{live_path}"\n'
                      f'[shadow]\nmodel = "{shadow_path}"\n')
    labels = write_csv(tmp_path / "labels.csv", [["sop_instance_uid", "label"]] + [
        [r.sop_instance_uid, "pneumonia" if i % 2 else "normal"] for i, r in enumerate(recorded)])
    out = tmp_path / "compared"
    result = pacs_ai("compare", "--config", str(config), "--json", "--out", str(out),
                     "--labels", str(labels))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["films"] == 3 and summary["not_assessed"] == {"outside-intended-age": 2}
    assert summary["agreement"] == 0.0
    assert summary["flips"] == {"normal_to_pneumonia": 3, "pneumonia_to_normal": 0}
    live, shadow = summary["rates"]["live"], summary["rates"]["shadow"]
    assert (live["normal"], shadow["pneumonia"], shadow["positive_rate"]) == (3, 3, 1.0)
    assert summary["labels"]["films"] == 3
    assert any(note.startswith("2 film(s) outside-intended-age") for note in summary["notes"])
    with (out / "films.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    html = (out / "report.html").read_text()
    assert "outside-intended-age 2" in html and "2 film(s) outside-intended-age" in html
    text = pacs_ai("compare", "--config", str(config), "--out", str(tmp_path / "text"))
    assert text.returncode == 0, text.stderr
    assert ("films:      3 assessed by both (not by the shadow: outside-intended-age 2)"
            in text.stdout)
    assert "note:       2 film(s) outside-intended-age" in text.stdout
    assert "flips:      normal -> pneumonia 3, pneumonia -> normal 0" in text.stdout


# --- the admin guide's shadow walkthrough, as written ---------------------------------------------

def guide_shadow_section() -> str:
    guide = (REPO_ROOT / "deploy" / "README.md").read_text()
    return guide.split("## Trying a new model in shadow, then promoting it", 1)[1].split(
        "\n## ", 1)[0]


@pytest.mark.real_peer
@pytest.mark.slow
def test_the_guide_shadow_walkthrough_runs_as_written(tmp_path, tiny_model):
    """deploy/README.md's sample-film steps (a scratch service with a shadow, dcmsend, compare
    with labels), run as one script as written: HOME, the installed model paths and the port put
    in, `pacs-ai` a wrapper for this tree's. The counts it prints are the guide's."""
    import re

    from pacs_ai.config import default_model_path
    from testbed.dicom_peers import free_port
    from testbed.environment import require_tool

    require_tool("dcmsend")
    section = guide_shadow_section()
    [block] = [block for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)
               if "mkdir -p ~/shadow-trial" in block]
    script = (block.replace("/opt/pacs-ai/models/pacs-ai-pneumonia.pt", str(default_model_path()))
              .replace("/opt/pacs-ai/models/candidate.pt", str(tiny_model))
              .replace("11113", str(free_port())))
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    wrapper = bin_folder / "pacs-ai"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pacs_ai "$@"\n')
    wrapper.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        ["bash", "-c", "set -e\n" + script], capture_output=True, text=True, timeout=600,
        cwd=REPO_ROOT, env=dict(os.environ, HOME=str(home), PYTHONPATH=str(REPO_ROOT),
                                PATH=f"{bin_folder}:{os.environ['PATH']}"))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    printed = result.stdout.replace(str(home), "/home/admin").splitlines()
    shown = section.split("The last\ncommand prints", 1)[1].split("```text\n", 1)[1]
    shown = shown.split("```", 1)[0].splitlines()
    for start in ("films:", "labelled:"):  # the films and labels; the models are others here
        [in_guide] = [line for line in shown if line.startswith(start)]
        [in_run] = [line for line in printed if line.startswith(start)]
        assert in_run.split(";")[0] == in_guide.split(";")[0], (in_run, in_guide)
    assert (home / "shadow-trial" / "report" / "scatter.svg").is_file()
    summary = json.loads((home / "shadow-trial" / "report" / "summary.json").read_text())
    assert summary["shadow"]["name"] == "tiny-test-model" and summary["not_assessed"] == {}
