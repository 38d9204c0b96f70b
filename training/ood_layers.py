"""Which layers the out-of-distribution score should use: abstention rates of one member's
Mahalanobis score from its last layer alone, and with the channel means after its first,
second or third max-pool added (each fitted on the member's training films, threshold at the
validation split's 0.985 quantile), on the stress shifts, heavy shifts and synthetic pictures.

`.venv/bin/python -m training.ood_layers runs/robust-s0` (about 8 minutes on 2 cores; the
figures in docs/generalisation.md). A study script, not part of the training command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pacs_ai.model.preprocessing import to_model_input
from training.abstention import HEAVY_SHIFTS, synthetic_pictures
from training.data import DEFAULT_CACHE_DIR, load_split
from training.ensemble import fit_gaussians, load_member
from training.shifts import CONDITIONS
from training.stress import cached_shifted_inputs, validation_files

BATCH = 128
VALIDATION_QUANTILE = 0.985  # 1.5 % of clean validation films abstain in every column
# the score's layers in each column: the last layer, plus channel means after a max-pool
COLUMNS = {"final": ["final"], "final+p2": ["final", "p2"], "final+p1": ["final", "p1"],
           "final+p3": ["final", "p3"], "final+p1+p2": ["final", "p1", "p2"]}


class LayerFeatures:
    """A member's features at its flatten layer and its channel means after each of its first
    three max-pools ("final", "p1", "p2", "p3")."""

    def __init__(self, network: nn.Sequential):
        self.layers = list(network)
        self.flatten = max(index for index, layer in enumerate(self.layers)
                           if isinstance(layer, nn.Flatten))
        pools = [index for index, layer in enumerate(self.layers[:self.flatten])
                 if isinstance(layer, nn.MaxPool2d)]
        self.taps = {"p1": pools[0], "p2": pools[1], "p3": pools[2]}

    @torch.inference_mode()
    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        found: dict[str, list[np.ndarray]] = {name: [] for name in ("final", *self.taps)}
        for start in range(0, len(inputs), BATCH):
            x = torch.from_numpy(np.asarray(inputs[start:start + BATCH], np.float32))
            x = x.reshape(-1, 1, 200, 200)
            for index, layer in enumerate(self.layers[:self.flatten + 1]):
                x = layer(x)
                for name, tap in self.taps.items():
                    if index == tap:
                        found[name].append(x.mean((2, 3)).numpy())
            found["final"].append(x.numpy())
        return {name: np.concatenate(parts) for name, parts in found.items()}


class LayerScores:
    """Mahalanobis distance to the nearer class, per feature dimension, summed over a column's
    layers; each layer's Gaussians fitted on the training films."""

    def __init__(self, training_features: dict[str, np.ndarray], labels: np.ndarray):
        self.fits = {name: fit_gaussians(features, labels)
                     for name, features in training_features.items()}

    def layer_score(self, features: np.ndarray, name: str) -> np.ndarray:
        means, precision = self.fits[name]
        distances = np.stack([np.einsum("nd,de,ne->n", features - mean, precision,
                                        features - mean) for mean in means], 1)
        return distances.min(1) / features.shape[1]

    def __call__(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {column: sum(self.layer_score(features[name], name) for name in names)
                for column, names in COLUMNS.items()}


def abstention_table(run: Path, data: Path) -> dict[str, dict[str, float]]:
    """Share abstained per set of films (rows) and score (columns)."""
    network, _config = load_member(run)
    features = LayerFeatures(network)
    split = json.loads((run / "split.json").read_text())
    films = load_split(data, "train", progress=False,
                       names=set(split["train"]) | set(split["validation"]))
    position = {path.name: index for index, path in enumerate(films.paths)}
    training = films.subset([position[name] for name in split["train"]])
    validation = films.subset([position[name] for name in split["validation"]])
    scores = LayerScores(features(training.inputs), training.labels)
    thresholds = {column: np.quantile(values, VALIDATION_QUANTILE)
                  for column, values in scores(features(validation.inputs)).items()}

    def abstained(inputs: np.ndarray) -> dict[str, float]:
        return {column: float((values > thresholds[column]).mean())
                for column, values in scores(features(inputs)).items()}

    rows = {}
    paths, _labels = validation_files(run / "split.json", data)
    for condition in list(CONDITIONS) + list(HEAVY_SHIFTS):
        cache = None if condition.group == "heavy" else DEFAULT_CACHE_DIR
        rows[condition.name] = abstained(cached_shifted_inputs(paths, condition, cache)[:, 0])
    for kind, pictures in synthetic_pictures().items():
        rows["syn-" + kind] = abstained(np.stack([to_model_input(p)[0] for p in pictures]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, nargs="?", default=Path("runs/robust-s0"),
                        help="a training run folder (config.json, checkpoint.pt, split.json)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = abstention_table(args.run, args.data)
    print("cond".ljust(18), " ".join(column.rjust(12) for column in COLUMNS))
    for name, shares in rows.items():
        print(name.ljust(18), " ".join(f"{shares[column]:12.3f}" for column in COLUMNS))


if __name__ == "__main__":
    main()
