"""`pacs-ai compare`'s work: the live and the shadow model over the films both assessed, from
the job store's `shadow_results` (pacs_ai.classify.shadow), optionally against the site's labels.

Each film has one outcome per model: pneumonia, normal, or abstained (its out-of-distribution
score above its threshold; no finding). The figures:

- films: both models assessed it (the shadow's status `assessed`); the films the live model
  assessed and the shadow did not (busy, model-failed, stopped, and outside-intended-age: the
  patient's age outside the shadow model's own range, a film it would skip if promoted) are
  counted apart and are in none of the figures;
- agreement: share of the films with the same outcome;
- flips: normal -> pneumonia and pneumonia -> normal (live -> shadow), and films one model
  abstained on that the other reported on;
- per model: positive rate (pneumonia among the films it reported on) and abstention rate
  (abstained among all films);
- with labels: each model's figures on the labelled films, as `pacs-ai evaluate` computes them
  (pacs_ai.evaluate.site_evaluation.summarise: at its threshold over the films it reported on, and over
  all of them with an abstention counted wrong).

The results may hold several pairs of models (a shadow replaced, a model promoted): one pair
is compared, the config's own where it has results, else the latest; the others are listed.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.errors import UserError
from pacs_ai.evaluate import report_folder
from pacs_ai.evaluate.site_evaluation import (LABEL_VALUES, labels_delimiter, read_labels_csv,
                                             summarise)
from pacs_ai.queue.shadow_records import ShadowResult, ShadowStatus

OUTPUT_FILES = {"report_html": "report.html", "scatter_svg": "scatter.svg",
                "films_csv": "films.csv", "summary_json": "summary.json"}  # in the --out folder

SUMMARY_FORMAT = "pacs-ai-comparison/1"
OUTCOMES = ("pneumonia", "normal", "abstained")
FILM_COLUMNS = ("sop_instance_uid", "received_at", "live_probability", "live_outcome",
                "live_ood_score", "shadow_probability", "shadow_outcome", "shadow_ood_score",
                "label")
KEY_COLUMNS = ("sop_instance_uid", "accession_number")  # a labels CSV keyed by either
MAX_PROBLEMS_SHOWN = 10
OUTSIDE_AGE_NOTE = ("{} film(s) outside-intended-age: the patient's age is outside the shadow "
                    "model's intended range, so promoted it would skip them; they are in none "
                    "of the figures")


def outcome(finding: str | None, abstained: bool | None) -> str:
    return "abstained" if abstained else (finding or "abstained")


@dataclass(frozen=True)
class Pair:
    """The live and the shadow model of some results (by file digest)."""

    live_sha256: str
    shadow_sha256: str


def pair_of(result: ShadowResult) -> Pair:
    return Pair(result.live_model_sha256, result.model_sha256)


def choose_pair(results: list[ShadowResult], live_sha256: str | None,
                shadow_sha256: str | None) -> Pair | None:
    """The pair to compare: the config's live and shadow files where both have results, else
    the config's shadow with any live model, else the pair with the latest result."""
    pairs = {pair_of(result) for result in results}
    if not pairs:
        return None
    wanted = Pair(live_sha256 or "", shadow_sha256 or "")
    if wanted in pairs:
        return wanted
    with_shadow = [result for result in results if result.model_sha256 == shadow_sha256]
    latest = max(with_shadow or results, key=lambda result: result.assessed_at)
    return pair_of(latest)


# --- labels ------------------------------------------------------------------------------------

@dataclass
class Labels:
    """Labels by SOP Instance UID or by accession number."""

    by_uid: dict[str, int] = field(default_factory=dict)
    by_accession: dict[str, int] = field(default_factory=dict)
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def of(self, result: ShadowResult) -> int | None:
        if result.sop_instance_uid in self.by_uid:
            return self.by_uid[result.sop_instance_uid]
        return self.by_accession.get(result.accession_number or "\0")


def read_labels(csv_path: Path) -> Labels:
    """A CSV with a header naming `label` and `sop_instance_uid` or `accession_number`; or the
    CSV `pacs-ai evaluate --labels` takes (path,label; the films' SOP Instance UIDs are read
    from their DICOM headers). UserError for a CSV that cannot be used."""
    if not csv_path.is_file():
        raise UserError(f"labels file not found: {csv_path}" if not csv_path.exists()
                        else f"labels file is not a file: {csv_path}")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read labels file {csv_path}: {error}") from None
    first = next((line for line in text.splitlines() if line.strip()
                  and not line.lstrip().startswith("#")), "")
    delimiter = labels_delimiter(first)
    header = [cell.strip().lower() for cell in next(csv.reader([first], delimiter=delimiter), [])]
    key = next((column for column in KEY_COLUMNS if column in header), None)
    if key is not None:
        return _keyed_labels(csv_path, text, delimiter, key)
    return _labels_from_films(csv_path)


def _keyed_labels(csv_path: Path, text: str, delimiter: str, key: str) -> Labels:
    labels = Labels(source=f"labels {csv_path} (by {key})")
    target = labels.by_uid if key == "sop_instance_uid" else labels.by_accession
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header: list[str] | None = None
    problems = []
    for row in reader:
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if header is None:
            header = [cell.lower() for cell in cells]
            if "label" not in header:
                raise UserError(f"{csv_path}: the header names {key} but no label column")
            continue
        record = dict(zip(header, cells))
        value, label = record.get(key, ""), LABEL_VALUES.get(record.get("label", "").lower())
        if not value or label is None:
            problems.append(f"line {reader.line_num}: expected a {key} and a label "
                            f"(normal, pneumonia, 0 or 1), got {delimiter.join(row)!r}")
            continue
        if target.get(value, label) != label:
            problems.append(f"line {reader.line_num}: {value} is labelled both ways")
        target[value] = label
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        raise UserError(f"{csv_path}: {len(problems)} row(s) cannot be used:\n  "
                        + "\n  ".join(shown))
    return labels


def _labels_from_films(csv_path: Path) -> Labels:
    import pydicom

    labelled = read_labels_csv(csv_path, csv_path.resolve().parent)
    labels = Labels(source=f"labels {csv_path} (films' SOP Instance UIDs)")
    unreadable = []
    for film in labelled.films:
        try:
            header = pydicom.dcmread(film.path, stop_before_pixels=True,
                                     specific_tags=["SOPInstanceUID"])
            labels.by_uid[str(header.SOPInstanceUID)] = film.label
        except Exception:  # a PNG or JPEG, or not a DICOM file: it has no UID to match
            unreadable.append(film.path)
    if unreadable:
        labels.notes.append(f"{len(unreadable)} listed file(s) have no readable SOP Instance "
                            f"UID (not DICOM?) and were not matched (e.g. {unreadable[0]})")
    return labels


# --- the figures ---------------------------------------------------------------------------------

def compare(results: list[ShadowResult], *, live_sha256: str | None = None,
            shadow_sha256: str | None = None, labels: Labels | None = None,
            context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """(summary.json, per-film rows) of the chosen pair over the films both assessed."""
    summary: dict[str, Any] = {"format": SUMMARY_FORMAT, **(context or {})}
    pair = choose_pair(results, live_sha256, shadow_sha256)
    summary["other_pairs"] = _other_pairs(results, pair)
    if pair is None:
        summary.update(films=0, live=None, shadow=None, not_assessed={})
        return summary, []
    mine = [result for result in results if pair_of(result) == pair]
    both = [result for result in mine if result.status == ShadowStatus.ASSESSED]
    newest = max(mine, key=lambda result: result.assessed_at)
    summary["live"] = {"name": newest.live_model_name, "version": newest.live_model_version,
                       "sha256": pair.live_sha256,
                       "thresholds": sorted({r.live_threshold for r in mine})}
    summary["shadow"] = {"name": newest.model_name, "version": newest.model_version,
                         "sha256": pair.shadow_sha256,
                         "thresholds": sorted({r.threshold for r in mine})}
    summary["not_assessed"] = dict(sorted(Counter(
        str(r.status) for r in mine if r.status != ShadowStatus.ASSESSED).items()))
    outside_age = summary["not_assessed"].get(ShadowStatus.OUTSIDE_INTENDED_AGE)
    if outside_age:
        summary["notes"] = [*summary.get("notes", []), OUTSIDE_AGE_NOTE.format(outside_age)]
    summary["films"] = len(both)
    if both:
        summary["period"] = {"first_received": _iso(min(r.received_at or 0 for r in both)),
                             "last_received": _iso(max(r.received_at or 0 for r in both))}
    summary.update(_agreement(both))
    summary["labels"] = None if labels is None else _labelled_figures(both, labels)
    rows = [_film_row(result, labels) for result in both]
    return summary, rows


def _agreement(both: list[ShadowResult]) -> dict[str, Any]:
    table = {live: {shadow: 0 for shadow in OUTCOMES} for live in OUTCOMES}
    for result in both:
        table[_live_outcome(result)][_shadow_outcome(result)] += 1
    films = len(both)

    def share(count: int, of: int) -> float | None:
        return count / of if of else None

    def rates(side: str) -> dict[str, Any]:
        counts = Counter(_live_outcome(r) if side == "live" else _shadow_outcome(r) for r in both)
        reported = counts["pneumonia"] + counts["normal"]
        return {"pneumonia": counts["pneumonia"], "normal": counts["normal"],
                "abstained": counts["abstained"],
                "positive_rate": share(counts["pneumonia"], reported),
                "abstention_rate": share(counts["abstained"], films)}

    live_p = np.array([r.live.probability for r in both], dtype=np.float64)
    shadow_p = np.array([r.shadow.probability for r in both], dtype=np.float64)
    return {
        "agreement": share(sum(table[o][o] for o in OUTCOMES), films),
        "flips": {"normal_to_pneumonia": table["normal"]["pneumonia"],
                  "pneumonia_to_normal": table["pneumonia"]["normal"]},
        "abstention_changes": {
            "reported_to_abstained": table["normal"]["abstained"]
            + table["pneumonia"]["abstained"],
            "abstained_to_reported": table["abstained"]["normal"]
            + table["abstained"]["pneumonia"]},
        "outcomes": {"rows": "live model", "columns": "shadow model", "counts": table},
        "rates": {"live": rates("live"), "shadow": rates("shadow")},
        "probability": {
            "mean_absolute_difference": float(np.mean(np.abs(live_p - shadow_p)))
            if films else None,
            "correlation": float(np.corrcoef(live_p, shadow_p)[0, 1])
            if films > 1 and live_p.std() > 0 and shadow_p.std() > 0 else None},
    }


def _live_outcome(result: ShadowResult) -> str:
    return outcome(result.live.finding, result.live.abstained)


def _shadow_outcome(result: ShadowResult) -> str:
    return outcome(result.shadow.finding, result.shadow.abstained)


def _labelled_figures(both: list[ShadowResult], labels: Labels) -> dict[str, Any]:
    labelled = [(result, labels.of(result)) for result in both]
    labelled = [(result, label) for result, label in labelled if label is not None]
    figures: dict[str, Any] = {"source": labels.source, "notes": labels.notes,
                               "films": len(labelled),
                               "normal": sum(label == 0 for _, label in labelled),
                               "pneumonia": sum(label == 1 for _, label in labelled)}
    for side in ("live", "shadow"):
        figures[side] = None
        if not labelled:
            continue
        rows = []
        for result, label in labelled:
            seen = result.live if side == "live" else result.shadow
            rows.append({"label": ("normal", "pneumonia")[label],
                         "status": "skipped" if seen.abstained else "ok",
                         "probability": seen.probability,
                         "reason": "out-of-distribution" if seen.abstained else None})
        threshold = (labelled[-1][0].live_threshold if side == "live"
                     else labelled[-1][0].threshold)
        # what `pacs-ai evaluate` computes, on these films at the model's threshold in force
        summary = summarise(rows, threshold=threshold, floor=0.95,
                            config_lines=lambda value: "")
        figures[side] = {
            "threshold": threshold, "computed": summary["figures_computed"],
            "too_small": summary["too_small"],
            "reported": summary["classified"], "all_films": (
                None if summary["all_films"] is None else
                {key: summary["all_films"][key] for key in ("sensitivity", "specificity",
                                                             "accuracy", "roc_auc")}),
            "abstained": summary["counts"]["skipped"]}
    return figures


def _film_row(result: ShadowResult, labels: Labels | None) -> dict[str, Any]:
    label = labels.of(result) if labels is not None else None
    return {"sop_instance_uid": result.sop_instance_uid,
            "received_at": _iso(result.received_at or 0),
            "live_probability": result.live.probability, "live_outcome": _live_outcome(result),
            "live_ood_score": result.live.ood_score,
            "shadow_probability": result.shadow.probability,
            "shadow_outcome": _shadow_outcome(result),
            "shadow_ood_score": result.shadow.ood_score,
            "label": None if label is None else ("normal", "pneumonia")[label]}


def _other_pairs(results: Iterable[ShadowResult], chosen: Pair | None) -> list[dict[str, Any]]:
    by_pair: dict[Pair, list[ShadowResult]] = {}
    for result in results:
        if pair_of(result) != chosen:
            by_pair.setdefault(pair_of(result), []).append(result)
    return [{"live": f"{group[-1].live_model_name} {group[-1].live_model_version}",
             "shadow": f"{group[-1].model_name} {group[-1].model_version}",
             "live_sha256": pair.live_sha256, "shadow_sha256": pair.shadow_sha256,
             "films": sum(r.status == ShadowStatus.ASSESSED for r in group)}
            for pair, group in by_pair.items()]


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def parse_since(text: str) -> float:
    """--since: a date (YYYY-MM-DD, from local midnight) or an ISO date and time; epoch."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(f"--since {text!r}: expected a date such as 2026-12-01 or a date and "
                        "time such as 2026-12-01T08:00") from None
    try:
        if moment.tzinfo is None:
            moment = moment.astimezone()  # local time, as the admin means it
        return moment.timestamp()
    # a moment the local clock cannot place (0001-01-01, or 9999-12-31 west of UTC)
    except (ValueError, OverflowError, OSError):
        raise UserError(f"--since {text!r}: out of range; give a date such as "
                        "2026-12-01") from None


def write_outputs(out: Path, summary: dict[str, Any], rows: list[dict]) -> dict[str, str]:
    """report.html, scatter.svg, films.csv and summary.json in `out` (created)."""
    import json

    from pacs_ai.evaluate.comparison_html import render_report, scatter_svg

    with report_folder.writing(out):
        paths = {key: out / name for key, name in OUTPUT_FILES.items()}
        summary["outputs"] = {key: str(path) for key, path in paths.items()}
        with paths["films_csv"].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=FILM_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: "" if row.get(key) is None else row[key]
                                 for key in FILM_COLUMNS})
        scatter = scatter_svg(summary, rows)
        paths["scatter_svg"].write_text(scatter + "\n", encoding="utf-8")
        paths["summary_json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        paths["report_html"].write_text(render_report(summary, scatter), encoding="utf-8")
    return summary["outputs"]
