"""Several trained networks as one model file: mean logit, plus an out-of-distribution score.

`python -m training ensemble --runs RUN... --out DIR --version V` writes DIR/model.pt (the
release: copy it and DIR/split.json to deploy/models/), DIR/report/ and DIR/summary.json.

Members are runs of one validation split (`train --split-seed S --seed W`), so the ensemble's
validation figures are as honest as each member's. The exported TorchScript module keeps the
contract's `forward` (input [N, 1, 200, 200] -> [N] logits) and adds `forward_with_ood`
([N] logits, [N] out-of-distribution scores) from one pass through the members.

The out-of-distribution score (Lee et al., NeurIPS 2018): each member's pooled features (the
global average pool before its last linear layer) are compared with a Gaussian per class with
a shared covariance, fitted on the member's training films; the score is the smaller squared
Mahalanobis distance of the two classes divided by the feature count (about 1 for a typical
training film), averaged over members. The abstention threshold is the validation split's
ABSTAIN_QUANTILE: about 1.5 % of validation films would abstain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import torch
from torch import nn

ABSTAIN_QUANTILE = 0.985
SHRINKAGE = 0.05  # covariance shrinkage towards its mean variance: a few thousand films, D ~ 128
OOD_METHOD = ("sum over two layers (the pooled features before the last linear layer, and the "
              "channel means after the second max-pool) of the smaller squared Mahalanobis "
              "distance to the two classes (shared covariance, fitted on the member's training "
              "films) / the feature count, averaged over members")


def split_member(network: nn.Sequential) -> Tuple[nn.Sequential, nn.Sequential, nn.Module]:
    """(stem up to the second max-pool, the rest up to the pooled features, the final linear
    layer) of a pacs_cnn-style network: [..., MaxPool2d, ..., MaxPool2d, ..., AdaptiveAvgPool2d,
    Flatten, Dropout?, Linear, Logit]. The stem's output is the score's second layer: its
    channel means see texture and composition (frames, inversion, processing) that the last
    layer, trained to ignore them, does not (docs/generalisation.md)."""
    layers = list(network)
    flatten = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Flatten))
    linear = [layer for layer in layers[flatten + 1:] if isinstance(layer, nn.Linear)]
    pools = [i for i, layer in enumerate(layers[:flatten]) if isinstance(layer, nn.MaxPool2d)]
    if len(linear) != 1 or len(pools) < 2:
        raise ValueError("member must have two max-pools and end in Flatten, [Dropout], one "
                         "Linear, Logit")
    tap = pools[1] + 1
    return nn.Sequential(*layers[:tap]), nn.Sequential(*layers[tap:flatten + 1]), linear[0]


def _stem_width(stem: nn.Sequential) -> int:
    return [layer for layer in stem if isinstance(layer, nn.Conv2d)][-1].out_channels


class EnsembleNetwork(nn.Module):
    """Members' mean logit and their Mahalanobis out-of-distribution score."""

    def __init__(self, members: List[nn.Sequential]):
        super().__init__()
        stems, tails, heads = zip(*(split_member(member) for member in members))
        self.stems = nn.ModuleList(stems)
        self.tails = nn.ModuleList(tails)
        self.heads = nn.ModuleList(heads)
        self.saliency_tap = _saliency_tap(tails[0])
        width, stem_width, count = heads[0].in_features, _stem_width(stems[0]), len(members)
        # per member and layer: class means [2, D] and the shared precision [D, D]; identity
        # until fitted
        self.register_buffer("class_means", torch.zeros(count, 2, width))
        self.register_buffer("precisions", torch.eye(width).repeat(count, 1, 1))
        self.register_buffer("stem_class_means", torch.zeros(count, 2, stem_width))
        self.register_buffer("stem_precisions", torch.eye(stem_width).repeat(count, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_ood(x)[0]

    @torch.jit.export
    def forward_with_ood(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        scores = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        index = 0
        for stem, tail, head in zip(self.stems, self.tails, self.heads):
            early = stem(x)
            features = tail(early)
            logits = logits + head(features).reshape(-1)
            scores = scores + _mahalanobis(features, self.class_means[index],
                                           self.precisions[index])
            scores = scores + _mahalanobis(early.mean(dim=(2, 3)), self.stem_class_means[index],
                                           self.stem_precisions[index])
            index += 1
        return logits / index, scores / index

    @torch.jit.export
    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """HiResCAM (Draelos & Carin 2020) of the mean logit, [N, 12, 12] for a 200 x 200 input,
        >= 0: per member, the activations of the block after its stem (before that block's
        max-pool) times the mean logit's gradient with respect to them, summed over channels;
        summed over members, then the ReLU. Chosen over Grad-CAM at this and four other layers by
        the deletion check (training/explain.py, deploy/models/MODEL_CARD.md). Call it with
        gradients enabled (not under torch.no_grad or inference_mode)."""
        total = torch.zeros(1, dtype=x.dtype, device=x.device)
        count = len(self.heads)
        index = 0
        for stem, tail, head in zip(self.stems, self.tails, self.heads):
            with torch.no_grad():
                early = stem(x)
                position = 0
                for layer in tail:  # up to the tail's first max-pool
                    if position < self.saliency_tap:
                        early = layer(early)
                    position += 1
            early = early.detach().requires_grad_(True)
            late = early
            position = 0
            for layer in tail:
                if position >= self.saliency_tap:
                    late = layer(late)
                position += 1
            logit = head(late).sum() / count
            gradient = torch.autograd.grad([logit], [early])[0]
            assert gradient is not None
            cam = (gradient * early.detach()).sum(dim=1)
            total = cam if index == 0 else total + cam
            index += 1
        return torch.relu(total)


    @torch.jit.export
    def forward_with_ood_and_saliency(
            self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward_with_ood's two outputs and saliency's map from one pass: the stems (most of
        the cost) run once, without gradients; only each member's layers after the map's tap
        keep theirs. Same values as the separate methods (tests)."""
        logits = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        scores = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        total = torch.zeros(1, dtype=x.dtype, device=x.device)
        count = len(self.heads)
        index = 0
        for stem, tail, head in zip(self.stems, self.tails, self.heads):
            with torch.no_grad():
                early = stem(x)
                before = early
                position = 0
                for layer in tail:
                    if position < self.saliency_tap:
                        before = layer(before)
                    position += 1
            before = before.detach().requires_grad_(True)
            features = before
            position = 0
            for layer in tail:
                if position >= self.saliency_tap:
                    features = layer(features)
                position += 1
            logit = head(features).reshape(-1)
            gradient = torch.autograd.grad([logit.sum() / count], [before])[0]
            assert gradient is not None
            cam = (gradient * before.detach()).sum(dim=1)
            total = cam if index == 0 else total + cam
            features = features.detach()
            logits = logits + logit.detach()
            scores = scores + _mahalanobis(features, self.class_means[index],
                                           self.precisions[index])
            scores = scores + _mahalanobis(early.mean(dim=(2, 3)), self.stem_class_means[index],
                                           self.stem_precisions[index])
            index += 1
        return logits / index, scores / index, torch.relu(total)


SALIENCY_METHOD = ("HiResCAM of the mean logit (gradient x activation summed over channels) at "
                   "each member's block after the stem, before its max-pool (12 x 12 over the "
                   "200 x 200 input), summed over members, then ReLU")


def _saliency_tap(tail: nn.Sequential) -> int:
    """Where in a member's tail the map is taken: before its first max-pool."""
    pools = [i for i, layer in enumerate(tail) if isinstance(layer, nn.MaxPool2d)]
    return pools[0] if pools else 0


def _mahalanobis(features: torch.Tensor, means: torch.Tensor,
                 precision: torch.Tensor) -> torch.Tensor:
    """The smaller squared distance to the two class means, divided by the feature count."""
    centred = features.unsqueeze(1) - means.unsqueeze(0)  # [N, 2, D]
    distances = (torch.matmul(centred, precision) * centred).sum(dim=2)
    return distances.min(dim=1).values / features.shape[1]


def fit_gaussians(features: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Class means [2, D] and the shrunk shared precision [D, D] of features [N, D]."""
    features = features.astype(np.float64)
    means = np.stack([features[labels == c].mean(0) for c in (0, 1)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    target = np.trace(covariance) / covariance.shape[0]
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * target * np.eye(covariance.shape[0])
    return means, np.linalg.inv(covariance)


@torch.inference_mode()
def features_of(stem: nn.Module, tail: nn.Module, inputs: np.ndarray,
                batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """(pooled features [N, D], stem channel means [N, C]) of inputs [N, 200, 200]."""
    stem.eval()
    tail.eval()
    features, means = [], []
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(np.asarray(inputs[start:start + batch_size], np.float32))
        early = stem(batch.unsqueeze(1))
        features.append(tail(early).numpy())
        means.append(early.mean(dim=(2, 3)).numpy())
    return np.concatenate(features), np.concatenate(means)


def fit_ood(ensemble: EnsembleNetwork, train_inputs: np.ndarray, train_labels: np.ndarray) -> None:
    for member, (stem, tail) in enumerate(zip(ensemble.stems, ensemble.tails)):
        features, stem_means = features_of(stem, tail, train_inputs)
        for values, means_buffer, precision_buffer in (
                (features, ensemble.class_means, ensemble.precisions),
                (stem_means, ensemble.stem_class_means, ensemble.stem_precisions)):
            means, precision = fit_gaussians(values, train_labels)
            means_buffer[member] = torch.from_numpy(means).float()
            precision_buffer[member] = torch.from_numpy(precision).float()


@torch.inference_mode()
def ensemble_outputs(ensemble: EnsembleNetwork, inputs: np.ndarray,
                     batch_size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """(probabilities, out-of-distribution scores) for inputs [N, 200, 200]."""
    ensemble.eval()
    probabilities, scores = [], []
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(np.asarray(inputs[start:start + batch_size], np.float32))
        logits, ood = ensemble.forward_with_ood(batch.unsqueeze(1))
        probabilities.append(torch.sigmoid(logits).numpy())
        scores.append(ood.numpy())
    return np.concatenate(probabilities), np.concatenate(scores)


def ensemble_stress(ensemble: EnsembleNetwork, data: Path, out: Path,
                    labels: np.ndarray) -> dict[str, np.ndarray]:
    """The ensemble's probabilities on the validation split under every stress condition."""
    from training.stress import stress_probabilities, validation_files

    out.mkdir(parents=True, exist_ok=True)
    paths, stress_labels = validation_files(out / "split.json", data)
    if not np.array_equal(stress_labels, labels):
        raise SystemExit("the stress films do not match the validation split")

    def predict(batch: np.ndarray) -> np.ndarray:
        return ensemble_outputs(ensemble, batch[:, 0])[0]

    return stress_probabilities(predict, paths)


def load_member(run: Path) -> Tuple[nn.Sequential, dict[str, Any]]:
    from training.models import CONFIGS, build_network

    config = json.loads((run / "config.json").read_text())
    network = build_network(CONFIGS[config["name"]])
    network.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True))
    return network.eval(), config


def build_ensemble(runs: List[Path], data: Path, out: Path, version: str,
                   name: str = "pacs-ai-pneumonia",
                   intended_use: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the OOD score, choose the threshold, write the report and export the model file."""
    from training.data import load_split
    from training.export import build_metadata, export_model
    from training.report import (SHIFT_SENSITIVITY_FLOOR, SHIFT_THRESHOLD_RULE, choose_threshold,
                                 write_report)
    from training.stress import markdown_table, summarise

    splits = [json.loads((run / "split.json").read_text()) for run in runs]
    if any(split["validation"] != splits[0]["validation"] for split in splits):
        raise SystemExit("ensemble members must share one validation split (train --split-seed)")
    images = load_split(data, "train", progress=False,
                        names=set(splits[0]["train"]) | set(splits[0]["validation"]))
    index_of = {path.name: i for i, path in enumerate(images.paths)}
    train = images.subset([index_of[n] for n in splits[0]["train"]])
    validation = images.subset([index_of[n] for n in splits[0]["validation"]])

    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps(splits[0], indent=1))
    members, configs = zip(*(load_member(run) for run in runs))
    ensemble = EnsembleNetwork(list(members))
    fit_ood(ensemble, train.inputs, train.labels)
    probabilities, scores = ensemble_outputs(ensemble, validation.inputs)
    stress = ensemble_stress(ensemble, data, out, validation.labels)
    pooled = np.concatenate(list(stress.values()))
    threshold = choose_threshold(pooled, np.tile(validation.labels, len(stress)),
                                 SHIFT_SENSITIVITY_FLOOR)
    ood_threshold = float(np.quantile(scores, ABSTAIN_QUANTILE))
    stress_summary = summarise(stress, validation.labels, threshold)
    (out / "stress.json").write_text(json.dumps(stress_summary, indent=2))
    np.savez_compressed(out / "stress_probabilities.npz", labels=validation.labels, **stress)
    (out / "stress.md").write_text(markdown_table(stress_summary, f"ensemble of {len(runs)}"))
    metrics = write_report(out / "report", probabilities, validation.labels, threshold,
                           title=f"ensemble of {len(runs)}")
    summary = {key: metrics[key] for key in ("accuracy", "sensitivity", "specificity", "roc_auc",
                                             "sensitivity_at_specificity_0.90", "ece", "count")}
    ood = {"method": OOD_METHOD, "threshold": ood_threshold,
           "validation_abstention": float((scores > ood_threshold).mean()),
           "threshold_rule": f"the validation split's {ABSTAIN_QUANTILE:g} quantile",
           "train_films": len(train)}
    metadata = build_metadata(
        name=name, version=version, threshold=threshold, threshold_rule=SHIFT_THRESHOLD_RULE,
        output="logit",
        architecture=f"ensemble of {len(runs)} x {configs[0]['description']}; mean logit",
        training={"members": [{"config": c["name"], "seed": c["seed"], "epochs": c["epochs"],
                               **({"finetune": c["finetune"]} if "finetune" in c else {})}
                              for c in configs],
                  "config": configs[0]["name"],
                  "split": "validation carved from train/ by patient and duplicate groups "
                           f"(split seed {splits[0]['seed']}); see the .split.json beside it"},
        validation_metrics=summary, ood=ood,
        stress={"worst": stress_summary["worst"], "mean_shifted": stress_summary["mean_shifted"],
                "conditions": len(stress)},
        saliency={"method": SALIENCY_METHOD,
                  "grid": list(ensemble.saliency(torch.zeros(1, 1, 200, 200)).shape[1:])},
        **({"intended_use": intended_use} if intended_use else {}))
    np.save(out / "validation_probabilities.npy", probabilities)
    np.save(out / "validation_ood_scores.npy", scores)
    (out / "summary.json").write_text(json.dumps({"threshold": threshold, **summary, "ood": ood},
                                                 indent=2))
    export_model(ensemble, out / "model.pt", metadata)
    return {"threshold": threshold, **summary, "ood": ood}


def with_saliency(source: Path, output: Path, version: str) -> dict[str, Any]:
    """Re-export an ensemble model file with the `saliency` method (contract version 2): the
    same weights and fitted buffers (loaded from the file itself, not from the runs) and the
    same metadata, under a new version. Checks that the new file gives the same
    probabilities and out-of-distribution scores as the old on test-pattern inputs."""
    from pacs_ai.model.model import FORMAT_ID, PneumoniaModel
    from training.export import export_model, git_commit
    from training.models import CONFIGS, build_network

    old = PneumoniaModel.load(source)
    metadata = dict(old.info.metadata)
    members = [build_network(CONFIGS[member["config"]])
               for member in metadata["training"]["members"]]
    ensemble = EnsembleNetwork(members)
    ensemble.load_state_dict(old.module.state_dict())
    grid = list(ensemble.eval().saliency(torch.zeros(1, 1, 200, 200)).shape[1:])
    metadata.update(
        format=FORMAT_ID, version=version,
        saliency={"method": SALIENCY_METHOD, "grid": grid},
        derived_from={"version": old.info.version, "created": metadata.get("created"),
                      "change": "saliency method added; weights, buffers and other metadata "
                                "unchanged", "exported_by_commit": git_commit()})
    export_model(ensemble, output, metadata)
    new = PneumoniaModel.load(output)
    inputs = np.random.default_rng(0).random((8, 1, 200, 200), dtype=np.float32)
    before, after = old.assess(inputs), new.assess(inputs)
    combined = new.assess_with_saliency(inputs)
    if not all(np.array_equal(before[i], candidate[i])
               for candidate in (after, combined) for i in (0, 1)):
        raise SystemExit(f"{output}: outputs differ from {source}; not released")
    return {"output": str(output), "version": version, "grid": grid,
            "bytes": output.stat().st_size}

