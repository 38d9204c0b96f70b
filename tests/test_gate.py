"""The gate (training.gate): its style transfer, made-up pictures and batches, the adult split
by patient, and a smoke run of gate -> gated-model -> the service's loader, whose file keeps
the classifier's outputs and abstains by the gate's score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pacs_ai.model.model import PneumoniaModel
from tests.test_robust_training import run_training
from tests.test_training import generated_layout
from training.data import ImageSet, patient_of
from training.gate import (MADE_UP_KINDS, GateData, GateRecipe, adult_split, gate_batch,
                           log_amplitude_profile, made_up_picture, restyle)


def smooth_pictures(count: int, sharpness: float, seed: int) -> np.ndarray:
    """uint8 [N, 224, 224] of blurred noise; a higher sharpness keeps more fine detail."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.normal(0, 1, (count, 224, 224)).astype(np.float32))
    spectrum = torch.fft.rfft2(noise)
    fy = torch.fft.fftfreq(224).view(-1, 1)
    fx = torch.fft.rfftfreq(224).view(1, -1)
    radius = torch.sqrt(fy ** 2 + fx ** 2) + 1e-3
    values = torch.fft.irfft2(spectrum * radius ** (-2.0 + sharpness), s=(224, 224))
    values = (values - values.mean()) / values.std() * 40 + 128
    return values.clamp(0, 255).round().to(torch.uint8).numpy()


def test_restyle_at_strength_0_keeps_the_picture_and_at_1_gives_the_other_sets_profile():
    soft, sharp = smooth_pictures(8, 0.0, 1), smooth_pictures(8, 1.0, 2)
    towards = torch.from_numpy(log_amplitude_profile(sharp) - log_amplitude_profile(soft))
    pictures = torch.from_numpy(soft.astype(np.float32))
    kept = restyle(pictures, towards, torch.zeros(8))
    assert torch.allclose(kept, pictures, atol=1e-2)
    moved = restyle(pictures, towards, torch.ones(8)).round().numpy().astype(np.uint8)
    before = np.abs(log_amplitude_profile(soft) - log_amplitude_profile(sharp))[1:].mean()
    after = np.abs(log_amplitude_profile(moved) - log_amplitude_profile(sharp))[1:].mean()
    assert after < 0.25 * before
    # the mean grey stays where it was (the zero frequency is not touched)
    assert np.allclose(moved.mean(axis=(1, 2)), soft.mean(axis=(1, 2)), atol=2.0)


@pytest.mark.parametrize("kind", MADE_UP_KINDS)
def test_every_made_up_kind_is_a_picture_the_service_can_prepare(kind):
    from pacs_ai.model.preprocessing import to_model_input

    film = smooth_pictures(1, 0.5, 3)[0]
    picture = made_up_picture(kind, np.random.default_rng(0), film)
    assert picture.shape == (224, 224) and np.isfinite(picture).all()
    assert to_model_input(np.clip(picture, 0, 255)).shape == (1, 200, 200)


def image_set(pictures: np.ndarray, names: list[str]) -> ImageSet:
    paths = [Path(n) for n in names]
    return ImageSet(paths, np.zeros(len(names), np.int64), [patient_of(p) for p in paths],
                    [n for n in names], np.zeros((len(names), 200, 200), np.float16), pictures)


def test_a_batch_holds_children_in_and_adults_and_made_up_pictures_out():
    children = image_set(smooth_pictures(30, 1.0, 4), [f"IM-{i:04d}-0001.jpeg" for i in range(30)])
    adults = image_set(smooth_pictures(20, 0.0, 5), [f"{i:08d}_000.png" for i in range(20)])
    data = GateData(children, children, adults, adults)
    styles = {"children": log_amplitude_profile(children.pictures),
              "adults": log_amplitude_profile(adults.pictures)}
    recipe = GateRecipe(children_per_batch=6, adults_per_batch=4, made_up_per_batch=3)
    inputs, labels = gate_batch(data, styles, recipe, torch.Generator().manual_seed(0),
                                np.random.default_rng(0))
    assert inputs.shape == (13, 1, 200, 200)
    assert labels.tolist() == [0.0] * 6 + [1.0] * 7


def test_nih_names_give_one_patient_and_the_adult_split_keeps_patients_together():
    assert patient_of(Path("00002339_011.jpeg")) == patient_of(Path("00002339_012.jpeg"))
    assert patient_of(Path("00002339_011.jpeg")) != patient_of(Path("00002344_002.jpeg"))
    names = [f"{patient:08d}_{visit:03d}.jpeg" for patient in range(40) for visit in range(3)]
    adults = image_set(np.zeros((len(names), 4, 4), np.uint8), names)
    split = adult_split(adults, seed=0)
    train = {patient_of(Path(n)) for n in split["train"]}
    validation = {patient_of(Path(n)) for n in split["validation"]}
    assert train and validation and not train & validation
    assert 0.2 < len(split["validation"]) / len(names) < 0.4


def adult_layout(root: Path, per_class: int = 12) -> Path:
    """Generated 'adult' films with NIH-style names (patient _ follow-up)."""
    rng = np.random.default_rng(1)
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            picture = rng.normal(90, 20, (64, 64)) + 40 * (np.arange(64) % 16 < 8)
            Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(
                folder / f"{label * 100 + i // 2:08d}_{i % 2:03d}.jpeg")
    return root


@pytest.mark.slow
def test_smoke_gate_behind_a_classifier_keeps_its_outputs_and_abstains_by_the_gate(tmp_path):
    from testbed.tiny_models import export_untrained_tiny_ensemble
    from training.gate import gate_scores, load_gate_member

    children = generated_layout(tmp_path / "chest_xray")
    adults = adult_layout(tmp_path / "adults")
    names = sorted(p.name for p in (children / "train").rglob("*.jpeg"))
    split = {"train": names[::2], "validation": names[1::2]}
    classifier = export_untrained_tiny_ensemble(tmp_path / "classifier.pt", ood_threshold=5.0,
                                                saliency=True)
    split_file = classifier.with_suffix(".split.json")
    split_file.write_text(json.dumps(split))
    run_training("gate", "--out", str(tmp_path / "gate"), "--seed", "0", "--data", str(children),
                 "--adults", str(adults), "--split-file", str(split_file), "--epochs", "1",
                 "--steps-per-epoch", "2")
    output = tmp_path / "gated.pt"
    run_training("gated-model", "--classifier", str(classifier), "--gates", str(tmp_path / "gate"),
                 "--version", "0.0.1-test", "--output", str(output), "--data", str(children),
                 "--adults", str(adults))

    source, gated = PneumoniaModel.load(classifier), PneumoniaModel.load(output)
    inputs = np.random.default_rng(2).random((5, 1, 200, 200), dtype=np.float32)
    probabilities, scores = gated.assess(inputs)
    assert np.array_equal(probabilities, source.assess(inputs)[0])
    gate = load_gate_member(tmp_path / "gate")
    np.testing.assert_allclose(scores, gate_scores([gate], inputs), rtol=1e-5, atol=1e-6)
    assert gated.info.version == "0.0.1-test" and gated.info.ood_threshold is not None
    metadata = gated.info.metadata
    assert metadata["ood"]["score"] == "gate"
    assert metadata["derived_from"]["version"] == "0.0.0-test"
    assert metadata["threshold"] == source.info.metadata["threshold"]
    # the one pass with maps gives the same numbers (computed here, both sides)
    together, together_scores, maps = gated.assess_with_saliency(inputs)
    assert together.tolist() == probabilities.tolist()
    np.testing.assert_allclose(together_scores, scores, rtol=1e-6)
    assert len(maps) == 5
    # abstention follows the gate's score and the stored threshold
    for score in scores:
        assert (gated.abstain_reason(float(score)) is None) == (score <= gated.info.ood_threshold)
    assert gated.abstain_reason(1.0).startswith("out-of-distribution: gate score 1.0000 above ")
    assert "young child's frontal chest film" in gated.abstain_reason(1.0)
    written = json.loads(output.with_suffix(".split.json").read_text())
    assert written["validation"] == split["validation"] and written["gate_adults"]["validation"]


def test_an_ood_threshold_set_for_a_distance_score_is_refused_for_a_gate():
    """1.2.x's score was a distance (threshold about 2); a gate's is a probability, so a site's
    [model] ood_threshold kept from then would let every film through."""
    from pacs_ai.config import default_model_path
    from pacs_ai.errors import UserError
    from pacs_ai.model.intended_use import site_model_info

    shipped = PneumoniaModel.load(default_model_path())
    assert shipped.info.metadata["ood"]["score"] == "gate"
    with pytest.raises(UserError, match=r"^\[model\] ood_threshold 2.05 is outside \(0, 1\]"):
        site_model_info(shipped.info, ood_threshold=2.05)
    with pytest.raises(UserError, match=r"^\[shadow\] ood_threshold 2.05 is outside"):
        site_model_info(shipped.info, ood_threshold=2.05, table="[shadow]")
    assert site_model_info(shipped.info, ood_threshold=0.5).ood_threshold == 0.5
    # 1: the gate never closes (a sigmoid's score is at most 1)
    assert site_model_info(shipped.info, ood_threshold=1).ood_threshold == 1.0
