"""Evaluation metrics and the report folder of a run (plots as PNG, numbers as JSON).

Plain numpy, so the figures are easy to check by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SENSITIVITY_TARGET = 0.98  # the first rule's target, kept for the threshold study
DECISION_POINT = 0.5  # where the class-balanced loss puts equal cost on both classes
SENSITIVITY_FLOOR = 0.97
THRESHOLD_RULE = (f"{DECISION_POINT:g} (the class-balanced loss's decision point) unless the "
                  f"validation sensitivity there is below {SENSITIVITY_FLOOR:g}; then the highest "
                  f"threshold whose validation sensitivity is >= {SENSITIVITY_FLOOR:g} (a missed "
                  "pneumonia costs more than a second look). Chosen over 'highest threshold with "
                  "sensitivity >= 0.98', whose threshold spanned 0.28-0.81 over 2 splits x 5 "
                  "seeds: docs/threshold-study.md")


def roc_curve(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, from high to low threshold."""
    order = np.argsort(-probabilities, kind="stable")
    scores, truth = probabilities[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores)), truth.size - 1]
    true_positives = np.cumsum(truth)[distinct]
    false_positives = (distinct + 1) - true_positives
    tpr = np.r_[0.0, true_positives / max(truth.sum(), 1)]
    fpr = np.r_[0.0, false_positives / max((1 - truth).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, scores[distinct]]


def roc_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(probabilities, labels)
    return float(np.trapezoid(tpr, fpr))


def sensitivity_at_specificity(probabilities: np.ndarray, labels: np.ndarray,
                               specificity: float = 0.90) -> float:
    fpr, tpr, _ = roc_curve(probabilities, labels)
    allowed = fpr <= 1 - specificity + 1e-12
    return float(tpr[allowed].max())


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """THRESHOLD_RULE: the decision point, lowered only as far as the sensitivity floor needs."""
    if metrics_at(probabilities, labels, DECISION_POINT)["sensitivity"] >= SENSITIVITY_FLOOR:
        return DECISION_POINT
    return min(DECISION_POINT, threshold_for_sensitivity(probabilities, labels, SENSITIVITY_FLOOR))


def threshold_for_sensitivity(probabilities: np.ndarray, labels: np.ndarray,
                              target_sensitivity: float) -> float:
    """The highest threshold that still finds target_sensitivity of pneumonias."""
    positives = np.sort(probabilities[labels == 1])
    if positives.size == 0:
        return 0.5
    # at most floor((1 - target) * n) positives may fall below the threshold
    allowed_misses = int(np.floor((1 - target_sensitivity) * positives.size + 1e-9))
    return float(positives[allowed_misses])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        confidence, frequency = probabilities[members].mean(), labels[members].mean()
        error += members.mean() * abs(confidence - frequency)
        table.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
                      "count": int(members.sum()), "mean_probability": float(confidence),
                      "fraction_pneumonia": float(frequency)})
    return float(error), table


def metrics_at(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """The full set of figures for one threshold."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = (probabilities >= threshold).astype(np.int64)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    per_class = {}
    for name, (hit, false_alarm, miss) in {"pneumonia": (tp, fp, fn), "normal": (tn, fn, fp)}.items():
        precision, recall = ratio(hit, hit + false_alarm), ratio(hit, hit + miss)
        per_class[name] = {"precision": precision, "recall": recall,
                           "f1": ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0,
                           "support": hit + miss}
    ece, reliability = expected_calibration_error(probabilities, labels)
    return {
        "count": int(labels.size), "threshold": float(threshold),
        "accuracy": ratio(tp + tn, labels.size),
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "roc_auc": roc_auc(probabilities, labels),
        "sensitivity_at_specificity_0.90": sensitivity_at_specificity(probabilities, labels, 0.90),
        "ece": ece, "per_class": per_class,
        "confusion_matrix": {"labels": ["normal", "pneumonia"], "rows_true_columns_predicted":
                             [[tn, fp], [fn, tp]]},
        "reliability": reliability,
    }


def write_report(folder: Path, probabilities: np.ndarray, labels: np.ndarray, threshold: float,
                 history: list[dict[str, float]] | None = None, title: str = "") -> dict[str, Any]:
    """metrics.json, confusion_matrix.json and the PNG plots; returns the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = metrics_at(probabilities, labels, threshold)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "confusion_matrix.json").write_text(json.dumps(metrics["confusion_matrix"], indent=2))

    matrix = np.array(metrics["confusion_matrix"]["rows_true_columns_predicted"])
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.imshow(matrix, cmap="Blues")
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, str(value), ha="center", va="center", fontsize=14)
    axis.set_xticks([0, 1], ["normal", "pneumonia"])
    axis.set_yticks([0, 1], ["normal", "pneumonia"])
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{title} threshold {threshold:.3f}")
    figure.tight_layout()
    figure.savefig(folder / "confusion_matrix.png", dpi=100)
    plt.close(figure)

    fpr, tpr, _ = roc_curve(np.asarray(probabilities, float), np.asarray(labels))
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(fpr, tpr, label=f"AUC {metrics['roc_auc']:.3f}")
    axis.plot([0, 1], [0, 1], ":", color="grey")
    axis.axvline(0.10, color="grey", lw=0.5)
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    axis.legend(loc="lower right")
    axis.set_title(f"ROC {title}")
    figure.tight_layout()
    figure.savefig(folder / "roc.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    bins = metrics["reliability"]
    axis.plot([0, 1], [0, 1], ":", color="grey")
    axis.plot([b["mean_probability"] for b in bins], [b["fraction_pneumonia"] for b in bins], "o-")
    axis.set_xlabel("mean predicted probability")
    axis.set_ylabel("fraction pneumonia")
    axis.set_title(f"reliability, ECE {metrics['ece']:.3f}")
    figure.tight_layout()
    figure.savefig(folder / "reliability.png", dpi=100)
    plt.close(figure)

    if history:
        epochs = [h["epoch"] for h in history]
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
        loss_axis.plot(epochs, [h["train_loss"] for h in history], label="train")
        loss_axis.plot(epochs, [h["val_loss"] for h in history], label="validation")
        loss_axis.set_title("loss")
        loss_axis.legend()
        accuracy_axis.plot(epochs, [h["train_accuracy"] for h in history], label="train")
        accuracy_axis.plot(epochs, [h["val_accuracy"] for h in history], label="validation (0.5)")
        accuracy_axis.set_title("accuracy")
        accuracy_axis.legend()
        for axis in (loss_axis, accuracy_axis):
            axis.set_xlabel("epoch")
        figure.tight_layout()
        figure.savefig(folder / "curves.png", dpi=100)
        plt.close(figure)
    return metrics
