"""Training: split rules, metrics, and a smoke run that exports, reloads and classifies."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testbed.environment import SHARED_DATA
from training.data import ImageSet, patient_of
from training.report import (DECISION_POINT, SENSITIVITY_FLOOR, choose_threshold,
                             expected_calibration_error, metrics_at, roc_auc,
                             threshold_for_sensitivity)
from training.split import make_split


def fake_set(patients, digests, labels):
    count = len(patients)
    return ImageSet([Path(f"f{i}.jpeg") for i in range(count)], np.array(labels), list(patients),
                    list(digests), np.zeros((count, 2, 2), np.float16))


def test_patient_keys_from_file_names():
    assert patient_of(Path("person1017_bacteria_2948.jpeg")) == "person1017"
    assert patient_of(Path("person3_virus_15.jpeg")) == "person3"
    assert patient_of(Path("IM-0117-0001.jpeg")) == "im-0117"
    assert patient_of(Path("NORMAL2-IM-0117-0001.jpeg")) == "normal2-im-0117"
    assert patient_of(Path("odd.png")) == "file:odd.png"


def test_split_keeps_patients_and_duplicates_on_one_side():
    rng = np.random.default_rng(1)
    patients = [f"person{rng.integers(0, 60)}" for _ in range(400)]
    labels = [int(p[-1]) % 4 != 0 for p in patients]  # a patient's images share a class
    digests = [f"d{i}" for i in range(400)]
    digests[10] = digests[300]  # the same picture under two patients' names
    images = fake_set(patients, digests, labels)
    split = make_split(images, 0.2, seed=3)
    train, validation = set(split["train"]), set(split["validation"])
    assert train.isdisjoint(validation) and len(train | validation) == 400
    assert {patients[i] for i in train}.isdisjoint({patients[i] for i in validation})
    assert ({10, 300} <= train) or ({10, 300} <= validation)
    assert 0.1 < len(validation) / 400 < 0.35
    assert make_split(images, 0.2, seed=3) == split
    assert make_split(images, 0.2, seed=4) != split


def test_roc_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probabilities = np.round(rng.random(300) * 0.6 + labels * 0.3, 2)  # with ties
    positives, negatives = probabilities[labels == 1], probabilities[labels == 0]
    pairwise = ((positives[:, None] > negatives[None, :]).mean()
                + 0.5 * (positives[:, None] == negatives[None, :]).mean())
    assert roc_auc(probabilities, labels) == pytest.approx(pairwise, abs=1e-9)


def test_sensitivity_threshold_keeps_the_target_sensitivity_and_is_the_highest_such():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 500)
    probabilities = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    threshold = threshold_for_sensitivity(probabilities, labels, 0.98)
    assert metrics_at(probabilities, labels, threshold)["sensitivity"] >= 0.98
    higher = np.min(probabilities[probabilities > threshold])
    assert metrics_at(probabilities, labels, higher)["sensitivity"] < 0.98


def test_threshold_rule_is_the_decision_point_when_it_keeps_the_sensitivity_floor():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 2000)
    well_separated = np.clip(rng.normal(0.1 + 0.8 * labels, 0.1), 0, 1)
    assert metrics_at(well_separated, labels, DECISION_POINT)["sensitivity"] >= SENSITIVITY_FLOOR
    assert choose_threshold(well_separated, labels) == DECISION_POINT


def test_threshold_rule_lowers_the_threshold_only_as_far_as_the_floor_needs():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 2000)
    overlapping = np.clip(rng.normal(0.3 + 0.3 * labels, 0.15), 0, 1)
    assert metrics_at(overlapping, labels, DECISION_POINT)["sensitivity"] < SENSITIVITY_FLOOR
    threshold = choose_threshold(overlapping, labels)
    assert threshold < DECISION_POINT
    assert threshold == threshold_for_sensitivity(overlapping, labels, SENSITIVITY_FLOOR)
    assert metrics_at(overlapping, labels, threshold)["sensitivity"] >= SENSITIVITY_FLOOR


def test_calibration_error_is_small_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(5)
    probabilities = rng.random(20000)
    labels = (rng.random(20000) < probabilities).astype(int)
    assert expected_calibration_error(probabilities, labels)[0] < 0.02
    assert expected_calibration_error(np.clip(probabilities * 0.3, 0, 1), labels)[0] > 0.2


def test_confusion_matrix_counts():
    metrics = metrics_at(np.array([0.9, 0.2, 0.6, 0.4]), np.array([1, 0, 0, 1]), 0.5)
    assert metrics["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 1], [1, 1]]
    assert metrics["accuracy"] == 0.5


def generated_layout(root: Path, per_class: int = 16) -> Path:
    """A tiny chest_xray layout of generated pictures, for machines without ../shared/data."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                picture = rng.normal(120, 30, (64, 64)) + label * 60 * (np.arange(64) > 32)
                file = f"person{i}_bacteria_{i}.jpeg" if label else f"IM-{i:04d}-0001.jpeg"
                Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(folder / file)
    return root


def test_smoke_training_run_exports_a_model_the_service_loads(tmp_path):
    data = SHARED_DATA / "chest_xray"
    if not (data / "train").is_dir():
        data = generated_layout(tmp_path / "chest_xray")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "training", "train", "--config", "smoke", "--data", str(data),
               "--out", str(run), "--limit-per-class", "24", "--quiet", "--version", "0.0.1-smoke"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(Path.cwd()), **__import__("os").environ})
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("model.pt", "checkpoint.pt", "split.json", "history.json", "summary.json",
                 "report/metrics.json", "report/roc.png", "report/confusion_matrix.png",
                 "report/reliability.png", "report/curves.png"):
        assert (run / name).is_file(), name

    metadata = json.loads(subprocess.run(
        [sys.executable, "-m", "pacs_ai", "model", "--model", str(run / "model.pt"), "--json"],
        capture_output=True, text=True, check=True, timeout=120).stdout)
    assert metadata["version"] == "0.0.1-smoke"
    assert metadata["input"]["shape"] == [1, 200, 200]
    assert 0 <= metadata["threshold"] <= 1 and "sensitivity" in metadata["threshold_rule"]
    assert set(metadata["validation_metrics"]) >= {"roc_auc", "accuracy", "ece"}

    released = tmp_path / "released.pt"
    subprocess.run([sys.executable, "-m", "training", "export", "--run", str(run), "--output",
                    str(released), "--version", "9.9.9"], check=True, capture_output=True,
                   timeout=120)
    picture = next((data / "val" / "PNEUMONIA").iterdir())
    lines = subprocess.run(
        [sys.executable, "-m", "pacs_ai", "classify", "--model", str(released), str(picture)],
        capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    result = json.loads(lines[0])
    assert result["status"] == "ok" and 0 <= result["probability"] <= 1
    assert result["model"] == {"name": "pacs-ai-pneumonia", "version": "9.9.9"}
    assert result["finding"] == ("pneumonia" if result["probability"] >= metadata["threshold"]
                                 else "normal")
