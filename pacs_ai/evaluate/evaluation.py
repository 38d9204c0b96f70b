"""Evaluation metrics of a binary classifier: ROC curve and AUC, the figures at one threshold,
the threshold for a sensitivity floor, calibration error.

Plain numpy, so the figures are easy to check by hand. The one source for both the service
(`pacs-ai evaluate`) and the training package (training/report.py imports them from here and
adds the plots). Labels: 1 pneumonia, 0 normal; a film is called pneumonia when its probability
is >= the threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def roc_curve(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, from high to low threshold."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
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


def threshold_for_sensitivity(probabilities: np.ndarray, labels: np.ndarray,
                              target_sensitivity: float) -> float:
    """The highest threshold that still finds target_sensitivity of pneumonias."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    positives = np.sort(probabilities[labels == 1])
    if positives.size == 0:
        return 0.5
    # at most floor((1 - target) * n) positives may fall below the threshold
    allowed_misses = int(np.floor((1 - target_sensitivity) * positives.size + 1e-9))
    return float(positives[allowed_misses])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
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


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a proportion (sensitivity, specificity), or None for
    total 0. It stays inside [0, 1] and is honest for small counts and proportions near 1."""
    if total <= 0:
        return None
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))
