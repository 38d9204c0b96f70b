"""Untrained tiny model files for tests of the service's plumbing: exported through the real
model contract (training.export), so the service loads them as it loads a trained one, but
their findings, scores and maps mean nothing. Tests only: the product never writes these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.ensemble import OOD_METHOD, SALIENCY_METHOD, EnsembleNetwork, fit_ood
from training.export import build_metadata, export_model
from training.models import pacs_cnn


def export_untrained_tiny_model(path: str | Path, *, threshold: float = 0.5,
                                intended_use: dict[str, Any] | None = None) -> Path:
    """A tiny randomly initialised CNN, exported through the real contract.

    For tests of the service plumbing only: its findings mean nothing. `intended_use` is
    stored as the metadata key of that name, e.g. {"age_years": [1, 5], "views": ["PA", "AP"]}.
    """
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.AvgPool2d(8), torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1),
        torch.nn.Flatten(0))
    extra = {"intended_use": intended_use} if intended_use is not None else {}
    metadata = build_metadata(name="tiny-test-model", version="0.0.0-test", threshold=threshold,
                              threshold_rule="fixed 0.5 (untrained test model)", **extra)
    return export_model(network, path, metadata)


def export_untrained_tiny_ensemble(path: Path, *, ood_threshold: float, members: int = 2,
                                   fit_inputs: np.ndarray | None = None,
                                   threshold: float = 0.5, saliency: bool = False) -> Path:
    """Tiny random members as an ensemble file with an OOD score, for tests of the plumbing:
    fitted on `fit_inputs` [N, 200, 200] (default: 16 random pictures), abstaining above
    `ood_threshold`; with `saliency`, a contract-2 file that gives maps. Its findings, scores
    and maps mean nothing."""
    torch.manual_seed(0)
    ensemble = EnsembleNetwork([pacs_cnn(widths=(4, 8, 8), downsample=2).eval()  # smoke-robust
                                for _ in range(members)])
    if fit_inputs is None:
        fit_inputs = np.random.default_rng(0).random((16, 200, 200), dtype=np.float32)
    fit_ood(ensemble, fit_inputs, np.arange(len(fit_inputs)) % 2)
    metadata = build_metadata(name="tiny-test-ensemble", version="0.0.0-test",
                              threshold=threshold, threshold_rule="fixed (untrained test model)",
                              ood={"method": OOD_METHOD, "threshold": ood_threshold},
                              training={"members": [{"config": "smoke-robust", "seed": 0,
                                                     "epochs": 0}] * members})
    if saliency:
        grid = list(ensemble.saliency(torch.zeros(1, 1, 200, 200)).shape[1:])
        metadata["saliency"] = {"method": SALIENCY_METHOD, "grid": grid}
    return export_model(ensemble, path, metadata)
