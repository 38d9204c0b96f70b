"""training.finetune: a released ensemble's members come out with the file's own weights, and a
smoke fine-tune writes a run folder that the ensemble command takes."""

from __future__ import annotations

import json

import numpy as np
import torch

from pacs_ai.model.model import PneumoniaModel
from testbed.tiny_models import export_untrained_tiny_ensemble
from tests.test_robust_training import run_training
from tests.test_training import generated_layout
from training.finetune import consistency_loss, members_of


def test_members_of_a_file_give_its_mean_logit(tmp_path):
    path = export_untrained_tiny_ensemble(tmp_path / "tiny.pt", ood_threshold=5.0, members=3)
    members, metadata = members_of(path)
    assert len(members) == 3 and metadata["version"] == "0.0.0-test"
    inputs = np.random.default_rng(0).random((4, 1, 200, 200), dtype=np.float32)
    with torch.no_grad():
        mean = torch.stack([member(torch.from_numpy(inputs)) for member in members]).mean(0)
    expected = PneumoniaModel.load(path).assess(inputs)[0]
    np.testing.assert_allclose(torch.sigmoid(mean).numpy(), expected, rtol=1e-5)


def test_the_consistency_penalty_ignores_differences_beyond_the_clip():
    first = torch.tensor([12.0, -1.0])
    second = torch.tensor([20.0, 1.0])
    assert consistency_loss(first, second, clip=8.0).item() == 2.0  # (0 + 4) / 2


def test_smoke_finetune_writes_a_run_the_ensemble_command_takes(tmp_path):
    data = generated_layout(tmp_path / "chest_xray")
    names = sorted(p.name for p in (data / "train").rglob("*.jpeg"))
    model = export_untrained_tiny_ensemble(tmp_path / "tiny.pt", ood_threshold=5.0)
    model.with_suffix(".split.json").write_text(json.dumps(
        {"seed": 0, "train": names[::2], "validation": names[1::2]}))
    runs = []
    for member in (0, 1):
        run = tmp_path / f"m{member}"
        run_training("finetune", "--model", str(model), "--member", str(member), "--out",
                     str(run), "--data", str(data), "--epochs", "1")
        assert {"checkpoint.pt", "model.pt", "config.json", "split.json", "history.json",
                "summary.json"} <= {p.name for p in run.iterdir()}
        runs.append(str(run))
    run_training("ensemble", "--runs", *runs, "--data", str(data), "--out",
                 str(tmp_path / "ensemble"), "--version", "0.0.1-test")
    ensemble = PneumoniaModel.load(tmp_path / "ensemble" / "model.pt")
    assert ensemble.has_saliency and len(ensemble.info.metadata["training"]["members"]) == 2
