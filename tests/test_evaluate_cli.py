"""`pacs-ai evaluate` run as a real subprocess on site folders built here from sample_dicoms/ and
small PNG/JPEG pictures, with tiny model files (a plain one; ensembles that abstain on every
film or on none). Expected counts come from sample_dicoms/manifest.json and the files written
here; every figure is checked against the per-film results.csv the command wrote."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from testbed.environment import REPO_ROOT, SAMPLE_DICOMS

pytestmark = pytest.mark.timeout(300)

MANIFEST = json.loads((SAMPLE_DICOMS / "manifest.json").read_text())["files"]
OK_SAMPLES = [e for e in MANIFEST if e["expected_status"] == "ok"]
# One skipped and one broken film in the PNEUMONIA folder: a site's set has such films too.
EXTRA_SAMPLES = {"skip_dx_chest_lateral.dcm": ("skipped", "not-frontal"),
                 "broken_truncated_pixel_data.dcm": ("error", "truncated-pixel-data")}
PICTURES_PER_CLASS = 2


def evaluate(*arguments: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "pacs_ai", "evaluate", *arguments],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=environment)


def write_pictures(folder: Path, count: int, seed: int, prefix: str = "film") -> list[Path]:
    """Grey chest-sized pictures (a gradient and noise), alternately PNG and JPEG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        gradient = np.linspace(0, 160, 240)[None, :] + np.linspace(0, 60, 220)[:, None]
        pixels = np.clip(gradient + rng.normal(0, 25 + 5 * index, (220, 240)), 0, 255)
        suffix = ".png" if index % 2 == 0 else ".jpg"
        path = folder / f"{prefix}-{index}{suffix}"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def read_results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def sensitivity_specificity(rows: list[dict[str, str]], threshold: float) -> tuple[float, float]:
    ok = [r for r in rows if r["status"] == "ok"]
    pneumonia = [float(r["probability"]) for r in ok if r["label"] == "pneumonia"]
    normal = [float(r["probability"]) for r in ok if r["label"] == "normal"]
    return (sum(p >= threshold for p in pneumonia) / len(pneumonia),
            sum(p < threshold for p in normal) / len(normal))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from testbed.tiny_models import export_untrained_tiny_ensemble, export_untrained_tiny_model

    folder = tmp_path_factory.mktemp("models")
    return {
        "tiny": export_untrained_tiny_model(folder / "tiny.pt"),
        "children": export_untrained_tiny_model(folder / "children.pt",
                                                intended_use={"age_years": [1, 5]}),
        "abstains": export_untrained_tiny_ensemble(folder / "abstains.pt", ood_threshold=1e-6),
        "never_abstains": export_untrained_tiny_ensemble(folder / "never.pt",
                                                         ood_threshold=1e9),
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """films/NORMAL and films/pneumonia (the case of the names varies at sites)."""
    root = tmp_path_factory.mktemp("site")
    folders = {"normal": root / "films" / "NORMAL", "pneumonia": root / "films" / "pneumonia"}
    expected = {"normal": {"ok": 0, "skipped": 0, "error": 0},
                "pneumonia": {"ok": 0, "skipped": 0, "error": 0}}
    statuses = {}
    for entry in OK_SAMPLES:
        label = entry["class"].lower()
        folders[label].mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_DICOMS / entry["file"], folders[label] / entry["file"])
        expected[label]["ok"] += 1
        statuses[entry["file"]] = ("ok", None)
    for name, (status, code) in EXTRA_SAMPLES.items():
        shutil.copy(SAMPLE_DICOMS / name, folders["pneumonia"] / name)
        expected["pneumonia"][status] += 1
        statuses[name] = (status, code)
    for seed, label in enumerate(("normal", "pneumonia")):
        for path in write_pictures(folders[label], PICTURES_PER_CLASS, seed, prefix=label):
            expected[label]["ok"] += 1
            statuses[path.name] = ("ok", None)
    (root / "films" / "README.md").write_text("site films\n")  # passed over, as in a walk
    (root / "films" / "stray.dcm").write_bytes((SAMPLE_DICOMS / OK_SAMPLES[0]["file"]).read_bytes())
    return {"root": root, "folder": root / "films", "expected": expected, "statuses": statuses}


@pytest.fixture(scope="module")
def folder_run(site, models, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out") / "evaluation"
    result = evaluate(str(site["folder"]), "--model", str(models["tiny"]), "--out", str(out))
    return {"result": result, "out": out, "summary": json.loads((out / "summary.json").read_text()),
            "rows": read_results(out)}


def test_counts_match_the_films_given(folder_run, site):
    result, summary = folder_run["result"], folder_run["summary"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected = site["expected"]
    counts = summary["counts"]
    for label in ("normal", "pneumonia"):
        mine = counts["per_class"][label]
        assert mine["films"] == sum(expected[label].values())
        assert mine["classified"] == expected[label]["ok"]
        assert mine["skipped"] == expected[label]["skipped"]
        assert mine["errors"] == expected[label]["error"]
    assert counts["films"] == sum(sum(e.values()) for e in expected.values())
    assert counts["skipped_by_reason"] == {"not-frontal": 1}
    assert counts["errors_by_reason"] == {"truncated-pixel-data": 1}
    assert summary["rates"]["abstention"] == 0
    assert summary["rates"]["skipped"] == pytest.approx(1 / counts["films"])
    # the stray file beside the class folders is named, not evaluated
    assert any("outside NORMAL/ and PNEUMONIA/" in note for note in summary["notes"])


def test_results_csv_has_one_row_per_film_with_its_status(folder_run, site):
    rows = folder_run["rows"]
    assert list(rows[0]) == ["path", "label", "status", "probability", "finding", "reason",
                             "ood_score"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == sorted(site["statuses"])
    for name, (status, code) in site["statuses"].items():
        row = by_name[name]
        assert row["status"] == status, row
        if status == "ok":
            assert 0 <= float(row["probability"]) <= 1 and row["finding"] in ("normal", "pneumonia")
        else:
            assert row["reason"].startswith(f"{code}: "), row
            assert row["finding"] == ""
        expected_label = "normal" if "NORMAL" in Path(row["path"]).parts else "pneumonia"
        assert row["label"] == expected_label


def test_the_figures_agree_with_the_per_film_results(folder_run):
    summary, rows = folder_run["summary"], folder_run["rows"]
    threshold = summary["threshold"]
    ok = [r for r in rows if r["status"] == "ok"]
    (tn, fp), (fn, tp) = summary["classified"]["confusion_matrix"]["counts"]
    assert tn + fp + fn + tp == summary["counts"]["classified"] == len(ok)

    def count(label: str, called: bool) -> int:
        return sum(r["label"] == label and (float(r["probability"]) >= threshold) == called
                   for r in ok)
    assert (tn, fp, fn, tp) == (count("normal", False), count("normal", True),
                                count("pneumonia", False), count("pneumonia", True))
    sensitivity, specificity = sensitivity_specificity(rows, threshold)
    assert summary["classified"]["sensitivity"] == pytest.approx(sensitivity)
    assert summary["classified"]["specificity"] == pytest.approx(specificity)
    # the site's view: every film not reported on counts as wrong
    everything = summary["all_films"]
    matrix = everything["confusion_matrix"]["counts"]
    (a_tn, a_fp, silent_normal), (a_fn, a_tp, silent_pneumonia) = matrix
    assert (a_tn, a_fp, a_fn, a_tp) == (tn, fp, fn, tp)
    assert silent_normal + silent_pneumonia == len(rows) - len(ok) == 2
    pneumonia_films = sum(r["label"] == "pneumonia" for r in rows)
    assert everything["sensitivity"] == pytest.approx(tp / pneumonia_films)
    assert everything["accuracy"] == pytest.approx((tp + tn) / len(rows))
    assert everything["sensitivity"] < summary["classified"]["sensitivity"] or tp == 0
    # AUC with the films not reported on ranked wrong: every pair with one of them is lost
    per_class = summary["counts"]["per_class"]
    share = ((per_class["normal"]["classified"] * per_class["pneumonia"]["classified"])
             / (per_class["normal"]["films"] * per_class["pneumonia"]["films"]))
    assert everything["roc_auc"] == pytest.approx(summary["classified"]["roc_auc"] * share)


@pytest.mark.parametrize("floor", [None, "0.8", "0.5"])
def test_the_proposed_threshold_keeps_the_floor_on_the_results(site, models, tmp_path, floor):
    from pacs_ai.model.site_threshold import file_sha256

    arguments = ["--sensitivity-floor", floor] if floor else []
    result = evaluate(str(site["folder"]), "--model", str(models["tiny"]),
                      "--out", str(tmp_path / "out"), *arguments)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = read_results(tmp_path / "out")
    wanted = float(floor) if floor else 0.95
    proposal = summary["proposed_threshold"]
    assert proposal["floor"] == wanted
    # the config lines printed are the proposal, and what they set keeps the floor
    printed = re.search(r"\[model\]\n\s*threshold = ([0-9.]+)\n\s*threshold_model_version = "
                        r'"([^"]+)"\n\s*threshold_model_sha256 = "([0-9a-f]{64})"', result.stdout)
    assert printed, result.stdout
    threshold = float(printed.group(1))
    assert threshold == proposal["threshold"]
    # bound to the file evaluated (pacs_ai.model.site_threshold)
    assert printed.group(2) == summary["model"]["version"] == "0.0.0-test"
    assert printed.group(3) == file_sha256(models["tiny"]) == summary["model"]["sha256"]
    assert proposal["config"] == "\n".join(line.strip() for line in
                                           printed.group(0).splitlines())
    sensitivity, specificity = sensitivity_specificity(rows, threshold)
    assert sensitivity >= wanted
    assert proposal["sensitivity"] == pytest.approx(sensitivity)
    assert proposal["specificity"] == pytest.approx(specificity)
    # no threshold at a pneumonia film's probability that keeps the floor is more specific,
    # and the next one below it clears fewer normal films (else it would keep more pneumonias
    # for the same specificity)
    pneumonia = sorted({float(r["probability"]) for r in rows
                        if r["status"] == "ok" and r["label"] == "pneumonia"})
    at_films = [sensitivity_specificity(rows, p) for p in pneumonia]
    assert max(spec for sens, spec in at_films if sens >= wanted) == specificity
    lower = [p for p in pneumonia if p < threshold - 2e-6]
    if lower:
        assert sensitivity_specificity(rows, lower[-1])[1] < specificity


def test_the_text_summary_and_the_report(folder_run):
    result, out, summary = folder_run["result"], folder_run["out"], folder_run["summary"]
    for words in ("AUC", "sensitivity", "specificity", "accuracy", "abstention",
                  "confusion matrix", "not reported = wrong", "proposed site threshold"):
        assert words in result.stdout
    counts = summary["counts"]["per_class"]
    # too few films: said, with the counts
    assert (f"WARNING: too few films to trust these figures: {counts['normal']['classified']} "
            f"normal and {counts['pneumonia']['classified']} pneumonia") in result.stdout
    assert summary["too_small"] is True
    assert "not to be relied on: too few films" in result.stdout
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 1 and "</svg>" in html and "<polyline" in html
    assert "<script" not in html and "src=" not in html  # self-contained
    assert "threshold = " in html and "too few films" in html


def test_json_prints_the_summary(site, models, tmp_path):
    result = evaluate(str(site["folder"]), "--model", str(models["tiny"]),
                      "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert printed == written
    assert printed["format"] == "pacs-ai-evaluation/1"


def test_the_warning_goes_when_there_are_enough_films(models, tmp_path):
    folder = tmp_path / "films"
    write_pictures(folder / "Normal", 50, seed=1)
    write_pictures(folder / "Pneumonia", 50, seed=2)
    result = evaluate(str(folder), "--model", str(models["tiny"]), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["classified"] == 100
    assert summary["too_small"] is False
    assert "too few films" not in result.stdout
    assert "too few films" not in (tmp_path / "out" / "report.html").read_text()


def test_labels_from_a_csv(site, models, tmp_path):
    films = tmp_path / "flat"
    films.mkdir()
    labels = {}
    for entry, spelling in zip(OK_SAMPLES[:8], ("NORMAL", "normal", "0", "Pneumonia", "1",
                                                 " pneumonia ", "0", "1")):
        shutil.copy(SAMPLE_DICOMS / entry["file"], films / entry["file"])
        labels[entry["file"]] = spelling
    for picture in write_pictures(films / "more", 2, seed=5):
        labels[f"more/{picture.name}"] = "1"
    (films / "not-labelled.png").write_bytes((films / "more" / "film-0.png").read_bytes())
    csv_path = tmp_path / "labels.csv"  # beside the folder: paths are relative to the CSV
    csv_path.write_text("path,label\n" + "".join(f"flat/{p},{label}\n"
                                                 for p, label in labels.items()))
    result = evaluate(str(films), "--labels", str(csv_path), "--model", str(models["tiny"]),
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    expected = {name: 1 if label.strip().lower() in ("1", "pneumonia") else 0
                for name, label in labels.items()}
    assert summary["counts"]["per_class"]["normal"]["films"] == list(expected.values()).count(0)
    assert summary["counts"]["per_class"]["pneumonia"]["films"] == list(expected.values()).count(1)
    assert summary["counts"]["classified"] == len(labels)
    rows = read_results(tmp_path / "out")
    for row in rows:
        name = Path(row["path"]).relative_to(films).as_posix()
        assert row["label"] == ("pneumonia" if expected[name] else "normal")
    assert any("not in the CSV" in note and "not-labelled.png" in note
               for note in summary["notes"])


def test_labels_as_excel_writes_them_in_a_semicolon_locale(models, tmp_path):
    """A BOM, CRLF, `;` between the columns, no header, and file names holding a comma (left
    unquoted, as it is not the separator): each row is read as path;label (the comma in the
    first row's name was taken as the separator, and every row refused)."""
    films = write_pictures(tmp_path / "films", 4, seed=6, prefix="scan, é")
    spellings = ("Normal", "PNEUMONIA ", "0", "pneumonia")
    rows = "".join(f"{film.name};{label}\r\n" for film, label in zip(films, spellings))
    csv_path = tmp_path / "films" / "labels.csv"
    csv_path.write_bytes(("\ufeff" + rows).encode("utf-8"))
    result = evaluate(str(tmp_path / "films"), "--labels", str(csv_path),
                      "--model", str(models["tiny"]), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    given = {row["path"]: row["label"] for row in read_results(tmp_path / "out")}
    assert given == {str(film): label for film, label in
                     zip(films, ("normal", "pneumonia", "normal", "pneumonia"))}


def test_the_report_never_overwrites_the_labels_csv(models, tmp_path):
    """A labels CSV named results.csv in the --out folder: refused before the films (it was
    read, then overwritten by the report's results.csv: the site's labels lost)."""
    films = write_pictures(tmp_path / "films", 2, seed=7)
    labels = tmp_path / "trial" / "results.csv"
    labels.parent.mkdir()
    text = "".join(f"../films/{film.name},{label}\n" for film, label in zip(films, ("0", "1")))
    labels.write_text(text)
    result = evaluate(str(tmp_path / "films"), "--labels", str(labels),
                      "--model", str(models["tiny"]), "--out", str(tmp_path / "trial"))
    assert result.returncode == 2, result.stdout
    assert f"its results.csv would overwrite {labels}" in result.stderr
    _no_traceback(result)
    assert labels.read_text() == text
    assert sorted(path.name for path in labels.parent.iterdir()) == ["results.csv"]


def test_a_second_run_the_same_day_keeps_the_first_report(site, models, tmp_path):
    """Without --out, the report goes to ./evaluation-YYYY-MM-DD; a second run that day (another
    model, another config) goes beside it, -2, instead of overwriting it."""
    import datetime

    first = evaluate(str(site["folder"]), "--model", str(models["tiny"]), cwd=tmp_path)
    second = evaluate(str(site["folder"]), "--model", str(models["tiny"]),
                      "--sensitivity-floor", "0.9", cwd=tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    folder = tmp_path / f"evaluation-{datetime.date.today().isoformat()}"
    assert sorted(path.name for path in tmp_path.iterdir()) == [folder.name, f"{folder.name}-2"]
    floors = [json.loads((path / "summary.json").read_text())["proposed_threshold"]["floor"]
              for path in (folder, tmp_path / f"{folder.name}-2")]
    assert floors == [0.95, 0.9]
    assert f"written:    {folder.name}-2/report.html" in second.stdout


def test_a_model_that_abstains_on_every_film(site, models, tmp_path):
    result = evaluate(str(site["folder"]), "--model", str(models["abstains"]),
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "nothing could be classified" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    films = summary["counts"]["films"]
    decodable = sum(e["ok"] for e in site["expected"].values())
    assert summary["counts"]["classified"] == 0
    assert summary["counts"]["skipped_by_reason"]["out-of-distribution"] == decodable
    assert summary["rates"]["abstention"] == pytest.approx(decodable / films)
    assert summary["classified"] is None and summary["proposed_threshold"] is None
    assert "out-of-distribution" in result.stdout and "WARNING" in result.stdout
    for row in read_results(tmp_path / "out"):
        if row["reason"].startswith("out-of-distribution"):
            assert row["status"] == "skipped" and float(row["ood_score"]) > 1e-6
            assert row["finding"] == ""
    assert "<svg" not in (tmp_path / "out" / "report.html").read_text()


def test_a_model_with_an_ood_score_that_never_abstains(site, models, tmp_path):
    result = evaluate(str(site["folder"]), "--model", str(models["never_abstains"]),
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rates"]["abstention"] == 0
    assert "out-of-distribution" not in summary["counts"]["skipped_by_reason"]
    assert summary["model"]["ood_threshold"] == 1e9
    ok = [r for r in read_results(tmp_path / "out") if r["status"] == "ok"]
    assert len(ok) == summary["counts"]["classified"] > 0
    assert all(float(r["ood_score"]) >= 0 for r in ok)


def test_the_config_threshold_and_age_range_apply_as_in_the_service(models, tmp_path):
    import pydicom

    from pacs_ai.model.site_threshold import file_sha256

    folder = tmp_path / "films"
    for label, entry in (("NORMAL", next(e for e in OK_SAMPLES if e["class"] == "NORMAL")),
                         ("PNEUMONIA", next(e for e in OK_SAMPLES if e["class"] == "PNEUMONIA"))):
        (folder / label).mkdir(parents=True)
        for age in ("003Y", "054Y"):
            dataset = pydicom.dcmread(SAMPLE_DICOMS / entry["file"])
            dataset.PatientAge = age
            dataset.save_as(folder / label / f"{age}-{entry['file']}")
    write_pictures(folder / "NORMAL", 1, seed=3)
    # the model is for ages 1-5: the 54-year-olds are skipped, as the service would
    result = evaluate(str(folder), "--model", str(models["children"]), "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["counts"]["skipped_by_reason"] == {"outside-intended-age": 2}
    assert summary["threshold"] == 0.5
    assert summary["model"]["threshold_source"] == "model file"
    # the site's [model] settings: its threshold is the one evaluated, its age range applies
    config = tmp_path / "pacs-ai.toml"
    config.write_text("[model]\nthreshold = 0.3\nmax_age_years = 60\n"
                      'threshold_model_version = "0.0.0-test"\n'
                      f'threshold_model_sha256 = "{file_sha256(models["children"])}"\n')
    result = evaluate(str(folder), "--model", str(models["children"]), "--config", str(config),
                      "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["counts"]["skipped"] == 0 and summary["counts"]["classified"] == 5
    assert summary["threshold"] == 0.3
    assert "[model] threshold" in summary["model"]["threshold_source"]
    assert "threshold:  0.3000 ([model] threshold in" in result.stdout
    rows = read_results(tmp_path / "b")
    called = sum(float(r["probability"]) >= 0.3 for r in rows)
    (tn, fp), (fn, tp) = summary["classified"]["confusion_matrix"]["counts"]
    assert fp + tp == called
    assert all(r["finding"] == ("pneumonia" if float(r["probability"]) >= 0.3 else "normal")
               for r in rows)
    # a threshold chosen for another model file is not evaluated (the service would refuse
    # it): the file's own is, and a note says why
    config.write_text('[model]\nthreshold = 0.3\nthreshold_model_version = "9.9.9"\n'
                      f'threshold_model_sha256 = "{"0" * 64}"\n')
    result = evaluate(str(folder), "--model", str(models["children"]), "--config", str(config),
                      "--out", str(tmp_path / "other"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "other" / "summary.json").read_text())
    assert summary["threshold"] == 0.5 and summary["model"]["threshold_source"] == "model file"
    [note] = summary["notes"]
    assert "[model] threshold in" in note and "chosen for model version 9.9.9" in note
    assert "note:" in result.stdout and "9.9.9" in result.stdout
    # [model] unknown_age = "skip": the picture, which has no age, is skipped as in the service
    config.write_text('[model]\nunknown_age = "skip"\n')
    result = evaluate(str(folder), "--model", str(models["children"]), "--config", str(config),
                      "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["counts"]["skipped_by_reason"] == {"outside-intended-age": 2,
                                                      "unknown-age": 1}
    [picture] = [r for r in read_results(tmp_path / "c") if r["path"].endswith(".png")]
    assert picture["status"] == "skipped" and picture["reason"].startswith("unknown-age: ")


def test_the_proposed_lines_keep_the_configs_ood_threshold_bound(site, models, tmp_path):
    """A config's ood_threshold bound to the file evaluated is applied, and the lines proposed
    carry it (they bind the whole table: pasted without it, the old one would stay unbound or
    bound to nothing). One chosen for another file is not applied, and the lines say to
    remove it rather than bind it to this file."""
    from pacs_ai.model.site_threshold import file_sha256

    model = models["never_abstains"]

    def evaluate_with(ood_threshold: str, version: str, sha256: str, out: str) -> dict:
        config = tmp_path / "pacs-ai.toml"
        config.write_text(f"[model]\nood_threshold = {ood_threshold}\n"
                          f'threshold_model_version = "{version}"\n'
                          f'threshold_model_sha256 = "{sha256}"\n')
        result = evaluate(str(site["folder"]), "--model", str(model), "--config", str(config),
                          "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
        return {"stdout": result.stdout,
                **json.loads((tmp_path / out / "summary.json").read_text())}

    summary = evaluate_with("1e8", "0.0.0-test", file_sha256(model), "bound")
    lines = summary["proposed_threshold"]["config"]
    assert "\nood_threshold = 100000000.0\n" in lines
    proposed = tomllib.loads(lines)["model"]
    assert proposed["ood_threshold"] == 1e8
    assert proposed["threshold_model_sha256"] == file_sha256(model)
    assert "ood_threshold = 100000000.0" in summary["stdout"]
    # summary.json names the threshold in force, and the file's own beside it
    assert summary["model"]["ood_threshold"] == 1e8
    assert summary["model"]["ood_threshold_source"].startswith("[model] ood_threshold in")
    assert summary["model"]["model_ood_threshold"] == 1e9
    # for another file: the file's own is evaluated, and the lines say to drop the old one
    summary = evaluate_with("0.02", "9.9.9", "0" * 64, "other")
    [note] = [note for note in summary["notes"] if "ood_threshold" in note]
    assert note.startswith("[model] ood_threshold in") and "chosen for model version 9.9.9" in note
    assert summary["rates"]["abstention"] == 0  # 0.02 would have abstained on every film
    assert summary["model"]["ood_threshold"] == 1e9
    assert summary["model"]["ood_threshold_source"] == "model file"
    lines = summary["proposed_threshold"]["config"]
    assert "ood_threshold" not in tomllib.loads(lines)["model"]
    assert "# and remove [model] ood_threshold = 0.02" in lines


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def test_usage_errors_exit_2_with_a_message(site, models, tmp_path):
    model = ["--model", str(models["tiny"]), "--out", str(tmp_path / "out")]
    result = evaluate(str(tmp_path / "no-such-folder"), *model)
    assert result.returncode == 2 and "folder not found" in result.stderr
    _no_traceback(result)

    result = evaluate(str(site["folder"]), "--labels", str(tmp_path / "missing.csv"), *model)
    assert result.returncode == 2 and "labels file not found" in result.stderr

    labels = tmp_path / "labels.csv"
    first = OK_SAMPLES[0]["file"]
    shutil.copy(SAMPLE_DICOMS / first, tmp_path / first)
    labels.write_text(f"path,label\n{first},normal\ngone.dcm,pneumonia\n{first},maybe\n")
    result = evaluate(str(tmp_path), "--labels", str(labels), *model)
    assert result.returncode == 2
    assert "line 3: file not found: gone.dcm" in result.stderr
    assert "line 4: unknown label 'maybe'" in result.stderr
    assert "line 4: " in result.stderr and "listed again (first on line 2)" in result.stderr
    _no_traceback(result)

    result = evaluate(str(site["folder"]), "--sensitivity-floor", "1.5", *model)
    assert result.returncode == 2 and "--sensitivity-floor" in result.stderr

    result = evaluate(str(site["folder"]), "--model", str(tmp_path / "none.pt"))
    assert result.returncode == 2 and "model file not found" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for a usage error"


def test_an_out_folder_that_cannot_be_made_is_named_before_the_films(site, models, tmp_path):
    """--out under a file: a one-line error naming it (a traceback after every film was
    classified before), and nothing written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    result = evaluate(str(site["folder"]), "--model", str(models["tiny"]),
                      "--out", str(blocker / "report"))
    assert result.returncode == 2
    assert f"pacs-ai evaluate: error: --out {blocker / 'report'}: {blocker} is not a folder" \
        in result.stderr
    _no_traceback(result)
    assert result.stdout == "", "the error comes before the films are classified"
    assert blocker.read_text() == "not a folder\n"


def test_unusable_labels_exit_1_with_a_message(models, tmp_path):
    model = ["--model", str(models["tiny"]), "--out", str(tmp_path / "out")]
    write_pictures(tmp_path / "flat", 2, seed=4)
    result = evaluate(str(tmp_path / "flat"), *model)
    assert result.returncode == 1
    assert "no NORMAL/ or PNEUMONIA/ sub-folder" in result.stderr
    _no_traceback(result)

    write_pictures(tmp_path / "one-class" / "PNEUMONIA", 2, seed=4)
    result = evaluate(str(tmp_path / "one-class"), *model)
    assert result.returncode == 1
    assert "all 2 labelled films are pneumonia" in result.stderr
    _no_traceback(result)


def test_the_service_side_needs_neither_training_nor_matplotlib(site, models, tmp_path):
    code = ("import sys\nfrom pacs_ai.cli import main\n"
            f"status = main(['evaluate', {str(site['folder'])!r}, '--model', "
            f"{str(models['tiny'])!r}, '--out', {str(tmp_path / 'out')!r}, '--json'])\n"
            "assert status == 0, status\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'training', 'matplotlib'})\n"
            "print('LOADED', loaded, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert "LOADED []" in result.stderr, result.stderr


def test_training_reports_use_the_same_metric_functions():
    import pacs_ai.evaluate.evaluation as evaluation
    import training.report as report

    for name in ("roc_curve", "roc_auc", "metrics_at", "threshold_for_sensitivity",
                 "expected_calibration_error", "sensitivity_at_specificity"):
        assert getattr(report, name) is getattr(evaluation, name)


def test_wilson_interval():
    from pacs_ai.evaluate.evaluation import wilson_interval

    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(19, 20)
    # by hand: centre (0.95 + 1.96²/40) / (1 + 1.96²/20) = 0.8775, half-width 0.1136
    assert 0.7635 < low < 0.7645 and 0.9905 < high < 0.9915
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and 0.83 < low < 0.84


def test_the_admin_guide_walkthrough_runs_as_written(models, tmp_path):
    """deploy/README.md's sample-film commands, run as written (HOME, the config and the
    program put in), give the counts its example output shows."""
    guide = (REPO_ROOT / "deploy" / "README.md").read_text()
    section = guide.split("## Validate on your own films before go-live", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.strip()]
    assert [c.split()[0] for c in commands] == ["mkdir", "cp", "cp", "sudo"], commands
    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[model]\npath = "{models["tiny"]}"\n')
    program = f"{sys.executable} -m pacs_ai "
    environment = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    for command in commands:
        command = command.replace("sudo pacs-ai ", program).replace(
            "/etc/pacs-ai/pacs-ai.toml", str(config))
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                timeout=300, cwd=REPO_ROOT, env=environment)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    summary = json.loads((tmp_path / "site-films-report" / "summary.json").read_text())
    counts = summary["counts"]
    shown = re.search(r"films: +(\d+) \(.*\): (\d+) normal, (\d+) pneumonia", section)
    assert shown, "the guide shows the films line"
    assert (counts["films"], counts["per_class"]["normal"]["films"],
            counts["per_class"]["pneumonia"]["films"]) == tuple(map(int, shown.groups()))
    assert re.search(rf"^classified +{counts['classified']} ", section, flags=re.M)
    assert counts["skipped_by_reason"] == {"not-frontal": 1} and "not-frontal 1" in section


# A model probability as `pacs-ai evaluate` prints it (the proposed threshold): six decimals.
PROBABILITY_AS_PRINTED = re.compile(r"\b0\.\d{6}\b")


def guide_evaluate_section() -> str:
    guide = (REPO_ROOT / "deploy" / "README.md").read_text()
    return guide.split("## Validate on your own films before go-live", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
def test_the_guide_sample_output_is_a_real_run_with_the_shipped_model(tmp_path):
    """Issue 23 item 8: the guide's sample output of `pacs-ai evaluate` showed model 1.2.0 and
    another proposed threshold than a run gives. The guide's sample-film commands, run as
    written with the shipped model (what install.sh puts in /opt/pacs-ai/models), print the
    guide's block line for line: the model's name, version and threshold as the shipped file
    states them, counts and figures as printed; only a model probability (the proposed
    threshold, six decimals) may differ by 1e-4, as another CPU's float kernels round
    differently. A new shipped model fails this until the guide shows its run (the failure
    prints it)."""
    from pacs_ai.config import default_model_path
    from pacs_ai.model.model import PneumoniaModel

    section = guide_evaluate_section()
    commands = [line.strip() for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.strip()]
    shown = section.split("with the shipped model", 1)[1].split("```text\n", 1)[1]
    shown = shown.split("```", 1)[0].splitlines()
    installed_model = "/opt/pacs-ai/models/pacs-ai-pneumonia.pt"
    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[model]\npath = "{default_model_path()}"\n')
    environment = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    for command in commands:
        command = command.replace("sudo pacs-ai ", f"{sys.executable} -m pacs_ai ").replace(
            "/etc/pacs-ai/pacs-ai.toml", str(config))
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                timeout=300, cwd=REPO_ROOT, env=environment)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    printed = (result.stdout.replace(str(default_model_path()), installed_model)
               .replace(str(tmp_path), "/home/admin").splitlines())
    again = "the guide's sample differs from this run; the run printed:\n" + "\n".join(printed)

    info = PneumoniaModel.load(default_model_path()).info
    assert f"model:      {info.name} {info.version} ({installed_model})" in shown, again
    assert any(line.startswith(f"threshold:  {info.threshold:.4f} (model file)")
               for line in shown), again
    assert len(shown) == len(printed), again
    for guide_line, run_line in zip(shown, printed):
        assert PROBABILITY_AS_PRINTED.sub("P", guide_line) == \
            PROBABILITY_AS_PRINTED.sub("P", run_line), again
        for in_guide, in_run in zip(PROBABILITY_AS_PRINTED.findall(guide_line),
                                    PROBABILITY_AS_PRINTED.findall(run_line)):
            assert float(in_guide) == pytest.approx(float(in_run), abs=1e-4), again
