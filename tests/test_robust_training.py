"""The robust recipe's parts: the batched equalisation equals the service's, augmentation of the
films' own grey levels, the stress shifts, and a smoke run of train -> ensemble -> stress ->
abstention whose model file the service loads and abstains with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pacs_ai.model.preprocessing import equalize_histogram, to_model_input
from testbed.environment import REPO_ROOT, SHARED_DATA
from tests.test_training import generated_layout
from training.augment import augment_pictures, equalize_batch
from training.shifts import CONDITIONS, CONDITIONS_BY_NAME


def test_batched_equalisation_equals_the_services_per_film_one_ties_included():
    rng = np.random.default_rng(3)
    pictures = rng.normal(100, 40, (4, 60, 50)).astype(np.float32)
    pictures[1, :10] = 0.0  # a black frame: many equal values
    pictures[2] = np.round(pictures[2] / 25)  # few grey levels
    pictures = np.clip(pictures, 0, None) / pictures.max()
    batched = equalize_batch(torch.from_numpy(pictures).unsqueeze(1)).numpy()[:, 0]
    for picture, equalised in zip(pictures, batched):
        assert np.allclose(equalised, equalize_histogram(picture), atol=1e-6)


def test_augmentation_is_seeded_and_gives_equalised_model_inputs():
    pictures = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (6, 224, 224), dtype=np.uint8))
    first = augment_pictures(pictures, torch.Generator().manual_seed(5))
    again = augment_pictures(pictures, torch.Generator().manual_seed(5))
    other = augment_pictures(pictures, torch.Generator().manual_seed(6))
    assert first.shape == (6, 1, 200, 200)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) > 0 and float(first.max()) < 1
    # rank-equalised: each film's values average one half
    assert torch.allclose(first.mean(dim=(1, 2, 3)), torch.full((6,), 0.5), atol=0.01)


@pytest.mark.parametrize("condition", CONDITIONS, ids=[c.name for c in CONDITIONS])
def test_every_stress_shift_gives_a_picture_the_service_can_prepare(condition):
    picture = np.random.default_rng(0).uniform(0, 255, (224, 224)).astype(np.float32)
    shifted = condition.apply(picture, np.random.default_rng(1))
    assert shifted.ndim == 2 and np.isfinite(shifted).all()
    assert to_model_input(shifted).shape == (1, 200, 200)


def test_field_of_view_shifts_cut_and_frame_as_named():
    picture = np.full((100, 100), 128.0, np.float32)
    rng = np.random.default_rng(0)
    assert CONDITIONS_BY_NAME["crop-tight-12"].apply(picture, rng).shape == (76, 76)
    framed = CONDITIONS_BY_NAME["border-white-12"].apply(picture, rng)
    assert framed.shape == (124, 124) and framed[0, 0] == 255 and framed[62, 62] == 128
    assert CONDITIONS_BY_NAME["wide-reflect-15"].apply(picture, rng).shape == (130, 100)


def run_training(*arguments: str) -> str:
    result = subprocess.run([sys.executable, "-m", "training", *arguments], capture_output=True,
                            text=True, timeout=600, cwd=REPO_ROOT,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_smoke_robust_members_make_an_ensemble_that_is_stressed_and_abstains(tmp_path):
    data = SHARED_DATA / "chest_xray"
    if not (data / "train").is_dir():
        data = generated_layout(tmp_path / "chest_xray")
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"member{seed}"
        run_training("train", "--config", "smoke-robust", "--data", str(data), "--out", str(run),
                     "--seed", str(seed), "--split-seed", "0", "--limit-per-class", "24",
                     "--quiet")
        runs.append(run)
    first, second = (json.loads((r / "split.json").read_text()) for r in runs)
    assert first["validation"] == second["validation"]  # one split, two weight seeds

    ensemble = tmp_path / "ensemble"
    run_training("ensemble", "--runs", *map(str, runs), "--data", str(data), "--out",
                 str(ensemble), "--version", "0.0.1-smoke")
    metadata = json.loads(subprocess.run(
        [sys.executable, "-m", "pacs_ai", "model", "--model", str(ensemble / "model.pt"),
         "--json"], capture_output=True, text=True, check=True, timeout=120,
        cwd=REPO_ROOT).stdout)
    assert metadata["intended_use"] == {"age_years": [1, 5], "views": ["PA", "AP"]}
    assert metadata["ood"]["threshold"] > 0
    assert len(metadata["training"]["members"]) == 2
    # the threshold is the validation split's 0.985 quantile: few validation films abstain
    scores = np.load(ensemble / "validation_ood_scores.npy")
    assert metadata["ood"]["threshold"] == pytest.approx(float(np.quantile(scores, 0.985)))
    assert (scores > metadata["ood"]["threshold"]).sum() <= max(1, np.ceil(0.015 * scores.size))

    # the operating point holds the sensitivity floor on the validation split pooled over
    # every stress condition, not on clean validation alone
    from training.report import SHIFT_SENSITIVITY_FLOOR, choose_threshold
    from training.shifts import CONDITIONS
    stressed = np.load(ensemble / "stress_probabilities.npz")
    assert set(stressed.files) == {"labels", *(c.name for c in CONDITIONS)}
    pooled = np.concatenate([stressed[c.name] for c in CONDITIONS])
    pooled_labels = np.tile(stressed["labels"], len(CONDITIONS))
    assert metadata["threshold"] == pytest.approx(
        choose_threshold(pooled, pooled_labels, SHIFT_SENSITIVITY_FLOOR))
    assert "pooled over the validation split under every stress" in metadata["threshold_rule"]

    stress = tmp_path / "stress"
    run_training("stress", "--model", str(ensemble / "model.pt"), "--data", str(data),
                 "--out", str(stress), "--conditions", "none,crop-tight-12,border-black-12")
    summary = json.loads((stress / "stress.json").read_text())
    assert set(summary["conditions"]) == {"none", "crop-tight-12", "border-black-12"}
    assert summary["count"] == len(first["validation"])
    worst = summary["worst"]["specificity"]
    assert worst["value"] == min(summary["conditions"][c]["specificity"]
                                 for c in ("crop-tight-12", "border-black-12"))

    unseen = tmp_path / "stress-unseen"
    printed = run_training("stress", "--model", str(ensemble / "model.pt"), "--data", str(data),
                           "--out", str(unseen), "--unseen-processing")
    from training.unseen_processing import UNSEEN_PROCESSING
    summary = json.loads((unseen / "stress.json").read_text())
    assert list(summary["conditions"]) == ["none", *(c.name for c in UNSEEN_PROCESSING)]
    assert all(f"| {c.name} |" in printed and c.description in printed
               for c in UNSEEN_PROCESSING)

    table = run_training("stress-table", str(stress), "--threshold", "1.0").splitlines()
    assert table[0].startswith("| model | threshold |") and len(table) == 3
    assert "| 1.000 |" in table[2] and "| 0.000 (" in table[2]  # nothing found at threshold 1

    abstention = tmp_path / "abstention"
    run_training("abstention", "--model", str(ensemble / "model.pt"), "--data", str(data),
                 "--out", str(abstention))
    sets = json.loads((abstention / "abstention.json").read_text())["sets"]
    assert sets["validation none"]["count"] == len(first["validation"])
    assert "synthetic checkerboard" in sets and "sample skip_ct_chest_slice.dcm" in sets


def test_the_stress_summary_shows_a_push_on_normal_films_that_specificity_hides():
    from training.stress import HARD_SITE_SPECIFICITY, summarise

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200, int), np.ones(200, int)]
    logits = np.r_[rng.normal(-7, 1.5, 200), rng.normal(6, 1.5, 200)]
    pushed = logits + np.where(labels == 0, 2.0, 0.0)  # e.g. a tight crop on every normal film
    summary = summarise({"none": 1 / (1 + np.exp(-logits)),
                         "crop": 1 / (1 + np.exp(-pushed))}, labels, threshold=0.5)
    unshifted, crop = summary["conditions"]["none"], summary["conditions"]["crop"]
    # at the model's threshold the push is invisible: these normal films sit far below it
    assert crop["specificity"] == unshifted["specificity"] == 1.0
    assert crop["normal_logit_shift"] == pytest.approx(2.0, abs=1e-6)
    assert unshifted["specificity_hard_site"] == pytest.approx(HARD_SITE_SPECIFICITY, abs=0.01)
    assert crop["specificity_hard_site"] < 0.6
    assert summary["worst"]["specificity_hard_site"]["condition"] == "crop"
