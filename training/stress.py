"""The stress test: the validation split under the acquisition shifts of training.shifts.

`python -m training stress --model FILE [--split-file SPLIT.json] --out DIR`

A validation split carved from train/ is in-distribution: it cannot show that a model reads the
field of view instead of the lungs. Here every validation film is put through each shift (from its
own pixels, before the service's preprocessing), classified through the model-file contract at the
model's stored threshold, and scored: AUC, sensitivity, specificity and accuracy per condition,
and the worst condition for each. Recipes and threshold rules are chosen on these figures together
with the unshifted ones (docs/generalisation.md). Nothing here reads a test split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from pacs_ai.model.preprocessing import PREPROCESSING_ID, to_model_input
from training import shifts
from training.data import DEFAULT_CACHE_DIR
from training.report import metrics_at
from training.shifts import CONDITIONS, CONDITIONS_BY_NAME, StressCondition

Predict = Callable[[np.ndarray], np.ndarray]  # float32 [N, 1, 200, 200] -> probabilities [N]
REPORTED = ("roc_auc", "sensitivity", "specificity", "accuracy")


def read_picture(path: Path) -> np.ndarray:
    """A film file as float32 grey levels 0-255, as the training data is read."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"), dtype=np.float32)


def validation_files(split_file: Path, data: Path) -> tuple[list[Path], np.ndarray]:
    """The validation films named in a split.json (written by `train`) and their labels."""
    from training.data import list_split

    names = json.loads(Path(split_file).read_text())["validation"]
    by_name = {path.name: (path, label) for path, label in list_split(data, "train")}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise SystemExit(f"{split_file}: {len(missing)} validation files are not in {data}/train, "
                         f"e.g. {missing[0]}")
    return [by_name[n][0] for n in names], np.array([by_name[n][1] for n in names])


def shifted_inputs(pictures: list[np.ndarray], condition: StressCondition,
                   seed: int = 0) -> np.ndarray:
    """Model inputs [N, 1, 200, 200] of every picture under one condition (seeded per film, so
    a condition with randomness gives the same films every time)."""
    inputs = np.empty((len(pictures), 1, 200, 200), dtype=np.float32)
    for index, picture in enumerate(pictures):
        rng = np.random.default_rng([seed, index])
        inputs[index] = to_model_input(condition.apply(picture, rng))
    return inputs


def cached_shifted_inputs(paths: list[Path], condition: StressCondition,
                          cache_dir: Path | None) -> np.ndarray:
    """shifted_inputs, cached per condition, film list and version of the shifts' code (the
    same films under the same shift are the same inputs for every model compared)."""
    if cache_dir is None:
        return shifted_inputs([read_picture(p) for p in paths], condition)
    key = hashlib.sha256(json.dumps([
        PREPROCESSING_ID, condition.name, [p.name for p in paths],
        hashlib.sha256(Path(shifts.__file__).read_bytes()).hexdigest()]).encode()).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"stress-{condition.name}-{key}.npy"
    if cache_file.is_file():
        return np.load(cache_file).astype(np.float32)
    inputs = shifted_inputs([read_picture(p) for p in paths], condition).astype(np.float16)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_suffix(".tmp.npy")
    np.save(temporary, inputs)  # float16, as the training cache: the same figures either way
    temporary.rename(cache_file)
    return inputs.astype(np.float32)


def stress_probabilities(predict: Predict, paths: list[Path],
                         conditions: Iterable[StressCondition] = CONDITIONS,
                         batch_size: int = 64,
                         cache_dir: Path | None = DEFAULT_CACHE_DIR) -> dict[str, np.ndarray]:
    """Probabilities of pneumonia per condition name."""
    results = {}
    for condition in conditions:
        inputs = cached_shifted_inputs(paths, condition, cache_dir)
        results[condition.name] = np.concatenate(
            [predict(inputs[start:start + batch_size])
             for start in range(0, len(inputs), batch_size)])
    return results


# The validation split's normal films sit far below any threshold (median logit about -6.6 for
# 1.2.x), so a shift that pushes every normal film towards pneumonia barely moves specificity
# there, while a site whose normal films are harder to call loses it (issue 22: a 12 % crop on
# every side cost the held-back films 12 points). Two figures show such a push whatever the
# split's difficulty: the median change of the normal films' logit, and the specificity at the
# point where the unshifted films' specificity is HARD_SITE_SPECIFICITY.
HARD_SITE_SPECIFICITY = 0.90


def _logit(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(probabilities, np.float64), 1e-9, 1 - 1e-9)
    return np.log(clipped / (1 - clipped))


def summarise(probabilities: dict[str, np.ndarray], labels: np.ndarray,
              threshold: float) -> dict:
    """Figures per condition at the threshold, and the worst shifted condition per figure.
    With the unshifted condition ("none") present, also each condition's push on the normal
    films: `normal_logit_shift` (median, against the same film unshifted) and
    `specificity_hard_site` (specificity at the threshold where the unshifted normal films'
    specificity is HARD_SITE_SPECIFICITY)."""
    rows = {}
    unshifted = probabilities.get("none")
    normal = labels == 0
    hard_point = (float(np.quantile(unshifted[normal], HARD_SITE_SPECIFICITY))
                  if unshifted is not None and normal.any() else None)
    for name, values in probabilities.items():
        metrics = metrics_at(values, labels, threshold)
        rows[name] = {key: metrics[key] for key in REPORTED}
        rows[name]["confusion"] = metrics["confusion_matrix"]["rows_true_columns_predicted"]
        if hard_point is not None:
            rows[name]["normal_logit_shift"] = float(np.median(
                _logit(values[normal]) - _logit(unshifted[normal])))
            rows[name]["specificity_hard_site"] = float((values[normal] < hard_point).mean())
    shifted = {name: row for name, row in rows.items() if name != "none"}
    worst = {}
    for key in REPORTED:
        if shifted:
            name = min(shifted, key=lambda n: shifted[n][key])
            worst[key] = {"condition": name, "value": shifted[name][key]}
    mean_shifted = {key: float(np.mean([row[key] for row in shifted.values()]))
                    for key in REPORTED} if shifted else {}
    for key in ("specificity_hard_site",):
        if shifted and all(key in row for row in shifted.values()):
            name = min(shifted, key=lambda n: shifted[n][key])
            worst[key] = {"condition": name, "value": shifted[name][key]}
            mean_shifted[key] = float(np.mean([row[key] for row in shifted.values()]))
    return {"threshold": threshold, "count": int(labels.size), "hard_site_point": hard_point,
            "normal": int((labels == 0).sum()), "pneumonia": int((labels == 1).sum()),
            "conditions": rows, "worst": worst, "mean_shifted": mean_shifted}


def markdown_table(summary: dict, title: str = "") -> str:
    descriptions = summary.get("descriptions") or {c.name: c.description for c in CONDITIONS}
    lines = [f"### {title}" if title else "",
             f"{summary['count']} validation films ({summary['normal']} normal, "
             f"{summary['pneumonia']} pneumonia), threshold {summary['threshold']:.3f}", "",
             "| condition | AUC | sensitivity | specificity | accuracy | normal films' logit "
             "shift (median) | specificity, hard site | what |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in summary["conditions"].items():
        push = (f"{row['normal_logit_shift']:+.2f} | {row['specificity_hard_site']:.3f}"
                if "normal_logit_shift" in row else " | ")
        lines.append(f"| {name} | {row['roc_auc']:.3f} | {row['sensitivity']:.3f} | "
                     f"{row['specificity']:.3f} | {row['accuracy']:.3f} | {push} | "
                     f"{descriptions.get(name, '')} |")
    if summary["worst"]:
        worst = summary["worst"]
        mean = summary["mean_shifted"]
        lines.append(f"| **worst shifted** | {worst['roc_auc']['value']:.3f} "
                     f"({worst['roc_auc']['condition']}) | {worst['sensitivity']['value']:.3f} "
                     f"({worst['sensitivity']['condition']}) | "
                     f"{worst['specificity']['value']:.3f} ({worst['specificity']['condition']}) | "
                     f"{worst['accuracy']['value']:.3f} ({worst['accuracy']['condition']}) | | "
                     + (f"{worst['specificity_hard_site']['value']:.3f} "
                        f"({worst['specificity_hard_site']['condition']})"
                        if "specificity_hard_site" in worst else "") + " | |")
        lines.append(f"| **mean shifted** | {mean['roc_auc']:.3f} | {mean['sensitivity']:.3f} | "
                     f"{mean['specificity']:.3f} | {mean['accuracy']:.3f} | | "
                     + (f"{mean['specificity_hard_site']:.3f}"
                        if "specificity_hard_site" in mean else "") + " | |")
    if summary.get("hard_site_point") is not None:
        lines += ["", "Hard site: specificity at the threshold where the unshifted normal films' "
                  f"specificity is {HARD_SITE_SPECIFICITY:.2f} "
                  f"({summary['hard_site_point']:.4f}): what a shift costs where normal films sit "
                  "nearer the threshold than this split's do."]
    return "\n".join(lines).lstrip("\n") + "\n"


def default_split_file(model_path: Path) -> Path | None:
    """The split a model was validated on: MODEL.split.json beside a released file, or the
    split.json of the run folder that holds model.pt."""
    for candidate in (model_path.with_suffix(".split.json"), model_path.parent / "split.json"):
        if candidate.is_file():
            return candidate
    return None


def run_stress(model_path: Path, data: Path, out: Path, split_file: Path | None = None,
               condition_names: list[str] | None = None, limit: int | None = None,
               unseen_processing: bool = False) -> dict:
    """The model's figures on the validation split under each stress condition (or those named).
    `unseen_processing`: under training.unseen_processing's conditions instead (and unshifted),
    which no training or threshold saw; computed, not cached (the cache keys on shifts.py)."""
    from pacs_ai.model.model import PneumoniaModel

    model = PneumoniaModel.load(model_path)
    split_file = split_file or default_split_file(model_path)
    if split_file is None:
        raise SystemExit(f"no split file for {model_path}: pass --split-file (a run's split.json)")
    paths, labels = validation_files(split_file, data)
    if limit:
        keep = np.r_[np.flatnonzero(labels == 0)[:limit], np.flatnonzero(labels == 1)[:limit]]
        paths, labels = [paths[i] for i in keep], labels[keep]
    conditions = [c for c in CONDITIONS if not condition_names or c.name in condition_names]
    if unseen_processing:
        from training.unseen_processing import UNSEEN_PROCESSING

        conditions = [CONDITIONS_BY_NAME["none"], *UNSEEN_PROCESSING]
        probabilities = {**stress_probabilities(model.predict, paths, conditions[:1]),
                         **stress_probabilities(model.predict, paths, conditions[1:],
                                                cache_dir=None)}
    else:
        probabilities = stress_probabilities(model.predict, paths, conditions)
    summary = summarise(probabilities, labels, model.info.threshold)
    summary.update(model=str(model_path), model_label=model.info.label,
                   split_file=str(split_file),
                   descriptions={c.name: c.description for c in conditions})
    out.mkdir(parents=True, exist_ok=True)
    (out / "stress.json").write_text(json.dumps(summary, indent=2))
    np.savez_compressed(out / "stress_probabilities.npz", labels=labels, **probabilities)
    (out / "stress.md").write_text(markdown_table(summary, model.info.label))
    return summary


def comparison_table(summaries: list[tuple[str, dict]]) -> str:
    """One row per model: unshifted figures, worst and mean over the shifts, at its threshold."""
    lines = ["| model | threshold | AUC | sens | spec | worst AUC | worst sens | worst spec | "
             "mean shifted sens | mean shifted spec |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, summary in summaries:
        clean, worst, mean = (summary["conditions"]["none"], summary["worst"],
                              summary["mean_shifted"])
        lines.append(
            f"| {label} | {summary['threshold']:.3f} | {clean['roc_auc']:.3f} | "
            f"{clean['sensitivity']:.3f} | {clean['specificity']:.3f} | "
            f"{worst['roc_auc']['value']:.3f} ({worst['roc_auc']['condition']}) | "
            f"{worst['sensitivity']['value']:.3f} ({worst['sensitivity']['condition']}) | "
            f"{worst['specificity']['value']:.3f} ({worst['specificity']['condition']}) | "
            f"{mean['sensitivity']:.3f} | {mean['specificity']:.3f} |")
    return "\n".join(lines) + "\n"


def rescore(summary_file: Path, threshold: float) -> dict:
    """A stress run's figures at another threshold, from its stored probabilities."""
    stored = np.load(Path(summary_file).parent / "stress_probabilities.npz")
    probabilities = {name: stored[name] for name in stored.files if name != "labels"}
    return summarise(probabilities, stored["labels"], threshold)
