"""The training loop: one named configuration, one seeded run, one run folder.

A run folder holds: config.json, split.json, history.json, checkpoint.pt (state dict),
model.pt (TorchScript per the contract), and report/ (validation figures and plots).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.augment import augment_batch, augment_pictures
from training.data import ImageSet
from training.export import build_metadata, export_model
from training.models import TrainingConfig, build_network
from training.report import THRESHOLD_RULE, choose_threshold, metrics_at, write_report


def predict(network: torch.nn.Module, inputs: np.ndarray, batch_size: int = 128,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Probabilities of pneumonia for [N, 200, 200] inputs; the network must be on `device`."""
    network.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = torch.from_numpy(np.asarray(inputs[start:start + batch_size], dtype=np.float32))
            outputs.append(torch.sigmoid(network(batch.unsqueeze(1).to(device))).cpu().numpy())
    return np.concatenate(outputs) if outputs else np.empty(0)


def class_weights(labels: np.ndarray, balance: bool) -> tuple[float, float]:
    """Loss weights (normal, pneumonia): equal total weight per class when balancing."""
    if not balance:
        return 1.0, 1.0
    count = len(labels)
    positives = max(int(labels.sum()), 1)
    negatives = max(count - positives, 1)
    return count / (2 * negatives), count / (2 * positives)


def train_run(config: TrainingConfig, train_set: ImageSet, validation_set: ImageSet,
              out_dir: Path, seed: int = 0, epochs: int | None = None, version: str = "dev",
              data_description: dict[str, Any] | None = None, progress: bool = True,
              device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train, evaluate on the validation split, choose the threshold, export. Returns metrics.

    device: where the network and batches live ("cpu", "cuda", ...). Augmentation stays on the
    CPU with the seeded CPU generator, so every device sees the same augmented pictures; the
    checkpoint and the exported model are always CPU tensors (the model-file contract).
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    epochs = epochs or config.epochs
    network = build_network(config).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = int(np.ceil(len(train_set) / config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=max(epochs * steps_per_epoch, 10),
        pct_start=0.2)
    weight_normal, weight_pneumonia = class_weights(train_set.labels, config.balance_classes)
    (out_dir / "config.json").write_text(json.dumps(
        {**asdict(config), "epochs": epochs, "seed": seed, "version": version,
         "train_images": len(train_set), "validation_images": len(validation_set),
         "class_weights": [weight_normal, weight_pneumonia], "device": str(device)},
        indent=2, default=str))

    history: list[dict[str, float]] = []
    started = time.monotonic()
    for epoch in range(1, epochs + 1):
        network.train()
        order = rng.permutation(len(train_set))
        total_loss, correct = 0.0, 0
        batches = range(0, len(order), config.batch_size)
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"{config.name} epoch {epoch}/{epochs}", unit="batch",
                           mininterval=5.0, leave=False)
        for start in batches:
            index = np.sort(order[start:start + config.batch_size])
            labels = torch.from_numpy(train_set.labels[index]).float()
            if config.augment_pictures:
                images = augment_pictures(torch.from_numpy(train_set.pictures[index]), generator)
            else:
                images = torch.from_numpy(
                    np.asarray(train_set.inputs[index], dtype=np.float32)).unsqueeze(1)
            if config.augment:
                images = augment_batch(images, generator)
            images, labels = images.to(device), labels.to(device)
            logits = network(images)
            weights = torch.where(labels > 0.5, weight_pneumonia, weight_normal)
            targets = labels * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
            loss = F.binary_cross_entropy_with_logits(logits, targets, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
            correct += int(((logits > 0) == (labels > 0.5)).sum())
        validation_probabilities = predict(network, validation_set.inputs, device=device)
        validation_loss = float(F.binary_cross_entropy(
            torch.from_numpy(validation_probabilities).double().clamp(1e-7, 1 - 1e-7),
            torch.from_numpy(validation_set.labels).double()))
        epoch_metrics = metrics_at(validation_probabilities, validation_set.labels, 0.5)
        history.append({"epoch": epoch, "train_loss": total_loss / len(train_set),
                        "train_accuracy": correct / len(train_set), "val_loss": validation_loss,
                        "val_accuracy": epoch_metrics["accuracy"], "val_auc": epoch_metrics["roc_auc"],
                        "elapsed_s": time.monotonic() - started})
        print(json.dumps({"run": config.name, **{k: round(v, 4) for k, v in history[-1].items()}}),
              flush=True)
    training_seconds = time.monotonic() - started
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    probabilities = predict(network, validation_set.inputs, device=device)
    network = network.cpu()  # the checkpoint and the TorchScript file hold CPU tensors
    torch.save(network.state_dict(), out_dir / "checkpoint.pt")

    threshold = choose_threshold(probabilities, validation_set.labels)
    np.save(out_dir / "validation_probabilities.npy", probabilities)
    metrics = write_report(out_dir / "report", probabilities, validation_set.labels, threshold,
                           history, title=config.name)
    metrics["training_seconds"] = training_seconds
    summary = {key: metrics[key] for key in ("accuracy", "sensitivity", "specificity", "roc_auc",
                                             "sensitivity_at_specificity_0.90", "ece", "count")}
    metadata = build_metadata(
        name=f"pacs-ai-pneumonia-{config.name}", version=version, threshold=threshold,
        threshold_rule=THRESHOLD_RULE, output="logit",
        architecture=config.description,
        training={"config": config.name, "epochs": epochs, "seed": seed,
                  "seconds": round(training_seconds, 1), "data": data_description or {},
                  "split": "validation carved from train/ by patient and duplicate groups; "
                           "see split.json of the run"},
        validation_metrics=summary)
    export_model(network, out_dir / "model.pt", metadata)
    (out_dir / "summary.json").write_text(json.dumps(
        {"config": config.name, "description": config.description, "seed": seed, "epochs": epochs,
         "threshold": threshold, "training_seconds": training_seconds, **summary,
         "accuracy_at_0.5": history[-1]["val_accuracy"]}, indent=2))
    return metrics
