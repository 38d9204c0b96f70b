"""A site's own labelled films through the model, as `pacs-ai evaluate` does it: reading the
labels, classifying the films the way the service would, the figures, a proposed site threshold
and the report folder (results.csv, summary.json, report.html).

Two sets of figures: over the films the model classified (what the model does when it answers)
and over every film with each film not reported on (skipped, abstained, unreadable) counted as
wrong (what the site gets). Metrics come from pacs_ai.evaluate.evaluation (numpy only).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.errors import UserError
from pacs_ai.evaluate.evaluation import metrics_at, roc_auc, roc_curve, wilson_interval
from pacs_ai.evaluate import report_folder
from pacs_ai.evaluate.offline_classification import expand_paths

CLASS_NAMES = ("normal", "pneumonia")  # label 0, label 1
LABEL_VALUES = {"normal": 0, "pneumonia": 1, "0": 0, "1": 1}
DELIMITERS = (",", ";", "\t")  # of a labels CSV, in order of preference
# Fewer classified films than this in a class: the figures are printed with a warning.
MIN_FILMS_PER_CLASS = 50
# More out-of-distribution abstentions than this share of the films: a warning.
ABSTENTION_WARNING = 0.05
OOD_CODE = "out-of-distribution"
# The proposed threshold is this far below the probability of the pneumonia film it keeps:
# probabilities are printed (results.csv) rounded to 6 decimals, and the film's own unrounded
# probability may lie up to 0.0000005 below the printed one.
THRESHOLD_MARGIN = 1e-6
RESULT_COLUMNS = ("path", "label", "status", "probability", "finding", "reason", "ood_score")
SUMMARY_FORMAT = "pacs-ai-evaluation/1"
OUTPUT_FILES = {"results_csv": "results.csv", "summary_json": "summary.json",
                "report_html": "report.html"}  # in the --out folder
MAX_PROBLEMS_SHOWN = 10


class LabelsUnusable(Exception):
    """The labelled set gives no figures (no labelled films, one class only): exit status 1."""


@dataclass(frozen=True)
class Film:
    path: Path
    label: int  # 1 pneumonia, 0 normal


@dataclass
class LabelledSet:
    films: list[Film]
    source: str  # how the labels were given, for the report
    notes: list[str] = field(default_factory=list)  # files passed over, and the like

    def count(self, label: int) -> int:
        return sum(film.label == label for film in self.films)


# --- the labels ------------------------------------------------------------------------------

def labelled_films(folder: Path, labels_csv: Path | None = None) -> LabelledSet:
    """The films and their labels: from FOLDER/NORMAL and FOLDER/PNEUMONIA (any case), or from
    a CSV of path,label. UserError (exit 2) for a wrong path or CSV, LabelsUnusable (exit 1)
    for a set without both classes."""
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}" if not folder.exists()
                        else f"not a folder: {folder}")
    labelled = (read_labels_csv(labels_csv, folder) if labels_csv is not None
                else _from_class_folders(folder))
    counts = {name: labelled.count(label) for label, name in enumerate(CLASS_NAMES)}
    if not labelled.films:
        raise LabelsUnusable(f"no films found ({labelled.source})")
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        present = next(name for name in CLASS_NAMES if name not in missing)
        raise LabelsUnusable(
            f"all {len(labelled.films)} labelled films are {present} ({labelled.source}); "
            f"sensitivity, specificity and the ROC need {missing[0]} films as well")
    return labelled


def _from_class_folders(folder: Path) -> LabelledSet:
    class_folders = [child for child in sorted(folder.iterdir())
                     if child.is_dir() and child.name.lower() in CLASS_NAMES]
    if not class_folders:
        raise LabelsUnusable(
            f"{folder} has no NORMAL/ or PNEUMONIA/ sub-folder (any case) and no --labels CSV "
            "was given: put the films in FOLDER/NORMAL/ and FOLDER/PNEUMONIA/, or list them in "
            "a CSV of path,label and pass it with --labels")
    films = [Film(path, CLASS_NAMES.index(class_folder.name.lower()))
             for class_folder in class_folders for path in expand_paths([class_folder])]
    names = " and ".join(f"{f.name}/" for f in class_folders)
    labelled = LabelledSet(films, f"sub-folders {names} of {folder}")
    outside = [path for path in expand_paths([folder])
               if not any(path.is_relative_to(f) for f in class_folders)]
    if outside:
        labelled.notes.append(
            f"{len(outside)} file(s) outside NORMAL/ and PNEUMONIA/ were not evaluated "
            f"(e.g. {outside[0]})")
    return labelled


def labels_delimiter(first_line: str) -> str:
    """The separator of a labels CSV, from its first row: the first of `,` `;` tab that makes it
    a header naming `label` or a row `path<sep>label`; a file name may hold the others (Excel
    in a semicolon locale writes `scan, 2.dcm;normal` unquoted). Else the first that occurs."""
    for delimiter in DELIMITERS:
        cells = [cell.strip().lower()
                 for cell in next(csv.reader([first_line], delimiter=delimiter), [])]
        if "label" in cells or (len(cells) == 2 and cells[1] in LABEL_VALUES):
            return delimiter
    return next((d for d in DELIMITERS if d in first_line), ",")


def read_labels_csv(csv_path: Path, folder: Path) -> LabelledSet:
    """Rows `path,label` (an optional header row naming the columns path and label; `;` or tab
    also accepted as the separator); label normal/pneumonia or 0/1, any case; paths relative
    to the CSV's folder. Every problem row is reported at once (UserError)."""
    if not csv_path.is_file():
        raise UserError(f"labels file not found: {csv_path}" if not csv_path.exists()
                        else f"labels file is not a file: {csv_path}")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # spreadsheets write a BOM
    except UnicodeDecodeError:
        raise UserError(f"{csv_path}: not UTF-8 text; save the labels as UTF-8 CSV") from None
    except OSError as error:
        raise UserError(f"cannot read labels file {csv_path}: {error.strerror}") from None
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = labels_delimiter(first_line)
    base = csv_path.resolve().parent
    films: list[Film] = []
    problems: list[str] = []
    seen: dict[Path, int] = {}
    path_column, label_column = 0, 1
    header_done = False
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    for row in reader:
        line = reader.line_num
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not header_done:
            header_done = True
            lowered = [cell.lower() for cell in cells]
            if "path" in lowered and "label" in lowered:
                path_column, label_column = lowered.index("path"), lowered.index("label")
                continue
        if len(cells) <= max(path_column, label_column):
            problems.append(f"line {line}: expected path{delimiter}label, "
                            f"got {delimiter.join(row)!r}")
            continue
        raw_path, raw_label = cells[path_column], cells[label_column]
        label = LABEL_VALUES.get(raw_label.lower())
        if label is None:
            problems.append(f"line {line}: unknown label {raw_label!r} (use normal, pneumonia, "
                            "0 or 1; a header row must name the columns path and label)")
        if not raw_path:
            problems.append(f"line {line}: empty path")
            continue
        path = Path(raw_path)
        resolved = path if path.is_absolute() else base / path
        if not resolved.exists():
            problems.append(f"line {line}: file not found: {raw_path} (looked for {resolved}; "
                            "paths are relative to the CSV's folder)")
            continue
        if resolved.is_dir():
            problems.append(f"line {line}: {raw_path} is a folder; list each film")
            continue
        key = resolved.resolve()
        if key in seen:
            problems.append(f"line {line}: {raw_path} is listed again (first on line {seen[key]})")
            continue
        seen[key] = line
        if label is not None:
            films.append(Film(resolved, label))
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        raise UserError(f"{csv_path}: {len(problems)} row(s) cannot be used:\n  "
                        + "\n  ".join(shown) + (f"\n  (and {more} more)" if more else ""))
    labelled = LabelledSet(films, f"labels {csv_path}")
    unlisted = [path for path in expand_paths([folder]) if path.resolve() not in seen
                and path.resolve() != csv_path.resolve()]
    if unlisted:
        labelled.notes.append(f"{len(unlisted)} file(s) under {folder} are not in the CSV and "
                              f"were not evaluated (e.g. {unlisted[0]})")
    return labelled


# --- classifying -----------------------------------------------------------------------------

def classify_labelled(films: list[Film], results: Iterable[dict[str, Any]],
                      progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """One row per film (RESULT_COLUMNS) from classify_files' results, in the same order."""
    rows = []
    for index, (film, result) in enumerate(zip(films, results, strict=True)):
        if result["path"] != str(film.path):  # classify_files keeps the order; check it
            raise RuntimeError(f"result for {result['path']} where {film.path} was expected")
        rows.append({"path": str(film.path), "label": CLASS_NAMES[film.label],
                     "status": result["status"], "probability": result.get("probability"),
                     "finding": result.get("finding"), "reason": result.get("reason"),
                     "ood_score": result.get("ood_score")})
        if progress is not None:
            progress(index + 1, len(films))
    return rows


def reason_code(reason: str | None) -> str:
    return (reason or "unknown").partition(":")[0].strip() or "unknown"


# --- the figures -----------------------------------------------------------------------------

def summarise(rows: list[dict[str, Any]], *, threshold: float, floor: float,
              config_lines: Callable[[str], str],
              context: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: counts, rates, the figures at `threshold` over the classified films and
    over all films (not reported = wrong), the proposed threshold for `floor` with the config
    lines that set it (`config_lines` of the threshold as written: bound to the model file,
    pacs_ai.model.site_threshold.threshold_lines), warnings."""
    labels = np.array([CLASS_NAMES.index(row["label"]) for row in rows], dtype=np.int64)
    status = np.array([row["status"] for row in rows])
    ok = status == "ok"
    probabilities = np.array([row["probability"] if row["status"] == "ok" else np.nan
                              for row in rows], dtype=np.float64)
    total = len(rows)
    per_class = {}
    for label, name in enumerate(CLASS_NAMES):
        mine = labels == label
        per_class[name] = {"films": int(mine.sum()), "classified": int((ok & mine).sum()),
                           "skipped": int(((status == "skipped") & mine).sum()),
                           "errors": int(((status == "error") & mine).sum()),
                           "abstained": sum(1 for row, m in zip(rows, mine) if m
                                            and row["status"] == "skipped"
                                            and reason_code(row["reason"]) == OOD_CODE)}
    skipped = Counter(reason_code(r["reason"]) for r in rows if r["status"] == "skipped")
    errors = Counter(reason_code(r["reason"]) for r in rows if r["status"] == "error")
    abstained = skipped.get(OOD_CODE, 0)

    def share(count: int) -> float:
        return count / total if total else 0.0

    summary: dict[str, Any] = {"format": SUMMARY_FORMAT, **(context or {})}
    summary.update({
        "threshold": threshold,
        "sensitivity_floor": floor,
        "counts": {"films": total, "classified": int(ok.sum()),
                   "skipped": int((status == "skipped").sum()),
                   "errors": int((status == "error").sum()),
                   "skipped_by_reason": dict(sorted(skipped.items())),
                   "errors_by_reason": dict(sorted(errors.items())),
                   "per_class": per_class},
        "rates": {"classified": share(int(ok.sum())), "abstention": share(abstained),
                  "skipped": share(int((status == "skipped").sum())),
                  "skipped_by_reason": {code: share(n) for code, n in sorted(skipped.items())},
                  "errors": share(int((status == "error").sum()))},
    })
    computable = all(per_class[name]["classified"] > 0 for name in CLASS_NAMES)
    summary["figures_computed"] = computable
    summary["classified"] = summary["all_films"] = summary["proposed_threshold"] = None
    if computable:
        summary["classified"] = _classified_figures(probabilities[ok], labels[ok], threshold)
        summary["all_films"] = _all_film_figures(probabilities, labels, ok, threshold)
        summary["proposed_threshold"] = _propose(probabilities, labels, ok, floor,
                                                 config_lines)
        summary["roc"] = _roc_points(probabilities, labels, ok)
    summary["too_small"] = any(per_class[name]["classified"] < MIN_FILMS_PER_CLASS
                               for name in CLASS_NAMES)
    summary["warnings"] = _warnings(summary)
    return summary


def _classified_figures(probabilities: np.ndarray, labels: np.ndarray,
                        threshold: float) -> dict[str, Any]:
    metrics = metrics_at(probabilities, labels, threshold)
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["rows_true_columns_predicted"]
    return {"films": int(labels.size), "threshold": threshold, "roc_auc": metrics["roc_auc"],
            "sensitivity": metrics["sensitivity"], "specificity": metrics["specificity"],
            "accuracy": metrics["accuracy"],
            "sensitivity_ci95": wilson_interval(tp, tp + fn),
            "specificity_ci95": wilson_interval(tn, tn + fp),
            "ece": metrics["ece"],
            "confusion_matrix": {"rows": "true normal, true pneumonia",
                                 "columns": "predicted normal, predicted pneumonia",
                                 "counts": [[tn, fp], [fn, tp]]}}


def _worst_case_scores(probabilities: np.ndarray, labels: np.ndarray,
                       ok: np.ndarray) -> np.ndarray:
    """Probabilities with each film not reported on ranked wrong: a pneumonia below every film,
    a normal above every film."""
    return np.where(ok, probabilities, np.where(labels == 1, -1.0, 2.0))


def _at_threshold_all(probabilities: np.ndarray, labels: np.ndarray, ok: np.ndarray,
                      threshold: float) -> dict[str, Any]:
    called = ok & (probabilities >= threshold)
    cleared = ok & (probabilities < threshold)
    tp, fn = int((called & (labels == 1)).sum()), int((cleared & (labels == 1)).sum())
    tn, fp = int((cleared & (labels == 0)).sum()), int((called & (labels == 0)).sum())
    silent_normal = int((~ok & (labels == 0)).sum())
    silent_pneumonia = int((~ok & (labels == 1)).sum())
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    return {"films": int(labels.size), "threshold": threshold,
            "sensitivity": tp / positives if positives else 0.0,
            "specificity": tn / negatives if negatives else 0.0,
            "accuracy": (tp + tn) / labels.size if labels.size else 0.0,
            "confusion_matrix": {"rows": "true normal, true pneumonia",
                                 "columns": "predicted normal, predicted pneumonia, not reported",
                                 "counts": [[tn, fp, silent_normal],
                                            [fn, tp, silent_pneumonia]]}}


def _all_film_figures(probabilities: np.ndarray, labels: np.ndarray, ok: np.ndarray,
                      threshold: float) -> dict[str, Any]:
    figures = _at_threshold_all(probabilities, labels, ok, threshold)
    figures["roc_auc"] = roc_auc(_worst_case_scores(probabilities, labels, ok), labels)
    return figures


def _propose(probabilities: np.ndarray, labels: np.ndarray, ok: np.ndarray, floor: float,
             config_lines: Callable[[str], str]) -> dict[str, Any]:
    proposed = proposed_threshold(probabilities[ok], labels[ok], floor)
    figures = _classified_figures(probabilities[ok], labels[ok], proposed)
    everything = _at_threshold_all(probabilities, labels, ok, proposed)
    return {"threshold": proposed, "floor": floor,
            "rule": (f"of the thresholds whose sensitivity on these classified films is >= "
                     f"{floor:g}, the most specific; of those, the one that keeps the most "
                     f"pneumonias ({THRESHOLD_MARGIN:g} below the probability of the pneumonia "
                     "film it keeps, so that rounding cannot lose that film)"),
            "sensitivity": figures["sensitivity"], "specificity": figures["specificity"],
            "accuracy": figures["accuracy"],
            "sensitivity_ci95": figures["sensitivity_ci95"],
            "specificity_ci95": figures["specificity_ci95"],
            "confusion_matrix": figures["confusion_matrix"],
            "all_films": {key: everything[key] for key in ("sensitivity", "specificity",
                                                            "accuracy")},
            "config": config_lines(format_threshold(proposed))}


def proposed_threshold(probabilities: np.ndarray, labels: np.ndarray, floor: float) -> float:
    """The site threshold proposed for a sensitivity floor. The candidates sit just below a
    pneumonia film's probability (THRESHOLD_MARGIN, rounded to 6 decimals, as written into the
    config). Of those that find at least `floor` of the pneumonias, the most specific; among
    those with that specificity, the lowest, which keeps the most pneumonias: raising the
    threshold further would give up sensitivity for no specificity (on 60 perfectly separated
    films the highest threshold meeting a 0.95 floor dropped one pneumonia of 30 for nothing)."""
    positives = np.sort(probabilities[labels == 1])
    negatives = np.sort(probabilities[labels == 0])
    candidates = np.unique(np.maximum(0.0, np.round(positives - THRESHOLD_MARGIN, 6)))
    found = positives.size - np.searchsorted(positives, candidates, side="left")  # p >= t
    cleared = np.searchsorted(negatives, candidates, side="left")  # p < t
    meets = found / positives.size >= floor - 1e-9
    most_cleared = cleared[meets].max()
    return float(candidates[meets & (cleared == most_cleared)].min())


def format_threshold(value: float) -> str:
    """Exactly the value (6 decimals at most), as a TOML float: 0.412344, 0.5, 0.0."""
    text = f"{value:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _roc_points(probabilities: np.ndarray, labels: np.ndarray,
                ok: np.ndarray) -> dict[str, Any]:
    fpr, tpr, _ = roc_curve(probabilities[ok], labels[ok])
    all_fpr, all_tpr, _ = roc_curve(_worst_case_scores(probabilities, labels, ok), labels)
    return {"classified": {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()},
            "all_films": {"fpr": all_fpr.round(6).tolist(), "tpr": all_tpr.round(6).tolist()}}


def _warnings(summary: dict[str, Any]) -> list[str]:
    warnings = []
    per_class = summary["counts"]["per_class"]
    if summary["too_small"]:
        counts = " and ".join(f"{per_class[name]['classified']} {name}" for name in CLASS_NAMES)
        detail = ""
        if summary["classified"] is not None:
            low, high = summary["classified"]["sensitivity_ci95"]
            detail = f"; the sensitivity's 95 % interval is {low:.2f}-{high:.2f}"
        warnings.append(
            f"too few films to trust these figures: {counts} film(s) were classified; at least "
            f"{MIN_FILMS_PER_CLASS} of each class are needed, and more before relying on a site "
            f"threshold{detail}")
    if summary["rates"]["abstention"] > ABSTENTION_WARNING:
        warnings.append(
            f"{summary['rates']['abstention']:.1%} of the films were abstained on as "
            "out-of-distribution (the model finds them unlike its training films; on its own "
            "validation films about 1-2 %): check that they are the frontal pediatric chest "
            "films the model is for")
    if summary["counts"]["errors"]:
        warnings.append(f"{summary['counts']['errors']} film(s) could not be read or decoded "
                        "(status error in results.csv)")
    return warnings


# --- the report folder -----------------------------------------------------------------------

def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, str]:
    """results.csv, summary.json and report.html in `out` (created); returns their paths."""
    from pacs_ai.evaluate.evaluation_html import render_report

    with report_folder.writing(out):
        paths = {key: out / name for key, name in OUTPUT_FILES.items()}
        summary["outputs"] = {key: str(path) for key, path in paths.items()}
        with paths["results_csv"].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: "" if row.get(key) is None else row[key]
                                 for key in RESULT_COLUMNS})
        paths["summary_json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        paths["report_html"].write_text(render_report(summary), encoding="utf-8")
    return summary["outputs"]

