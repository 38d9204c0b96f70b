"""Named network configurations: the seed study's family and our own CNN.

Every network takes [N, 1, 200, 200] in [0, 1] (from pacs_ai.model.preprocessing.to_model_input) and
returns [N] logits of "pneumonia". Input scaling lives inside the network (the model-file contract).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pacs_ai.model.preprocessing import MODEL_INPUT_SIZE


class CenterInput(nn.Module):
    """Equalised input is uniform on [0, 1]: centre it to zero mean and unit variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 3.4641016  # 1 / std of U(0, 1)


class Logit(nn.Module):
    """[N, 1] -> [N]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)


def dnn(hidden: tuple[int, ...] = (), dropout: float = 0.0) -> nn.Module:
    """The seed's DNN: flattened 200x200 input, optional hidden layers, one logit."""
    layers: list[nn.Module] = [CenterInput(), nn.Flatten()]
    width = MODEL_INPUT_SIZE * MODEL_INPUT_SIZE
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers += [nn.Linear(width, 1), Logit()]
    return nn.Sequential(*layers)


def seed_cnn(dropout: float = 0.0) -> nn.Module:
    """The seed's CNN: 3 x (conv 3x3 + ReLU + max-pool 2) + flatten + 1 dense output."""
    layers: list[nn.Module] = [CenterInput()]
    channels = 1
    for width in (16, 32, 64):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    layers.append(nn.Flatten())
    if dropout:
        layers.append(nn.Dropout(dropout))
    side = MODEL_INPUT_SIZE // 8
    layers += [nn.Linear(channels * side * side, 1), Logit()]
    return nn.Sequential(*layers)


def conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def pacs_cnn(widths: tuple[int, ...] = (24, 32, 64, 96, 128), dropout: float = 0.3,
             downsample: int = 1) -> nn.Module:
    """Our CNN: a strided stem to 100x100, conv-BN-ReLU blocks with max-pooling, global
    average pooling, dropout, one logit. About 0.46 M parameters; small enough for 2 CPU cores.

    downsample: average-pool the 200x200 input first (2: the network sees 100x100, 7x cheaper
    to train on 2 cores; the literature finds little gain above about 128 px, and fine
    texture is what blur and edge enhancement change from site to site)."""
    layers: list[nn.Module] = [CenterInput()]
    if downsample > 1:
        layers.append(nn.AvgPool2d(downsample))
    layers += [nn.Conv2d(1, widths[0], 5, stride=2, padding=2, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    for index in range(1, len(widths)):
        layers += conv_block(widths[index - 1], widths[index])
        if index >= 2:  # second block onwards also gets a second conv for depth
            layers += conv_block(widths[index], widths[index])
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
               nn.Linear(widths[-1], 1), Logit()]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class TrainingConfig:
    """A named recipe: network, epochs and optimisation; see CONFIGS."""

    name: str
    description: str
    build: str  # key into BUILDERS
    build_args: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = False
    # the robust recipe: augment the films' own grey levels (field of view, borders, blur,
    # sharpening, noise, markers) before the rank equalisation (training.augment.augment_pictures)
    augment_pictures: bool = False
    balance_classes: bool = False
    label_smoothing: float = 0.0


BUILDERS = {"dnn": dnn, "seed_cnn": seed_cnn, "pacs_cnn": pacs_cnn}

CONFIGS = {c.name: c for c in [
    TrainingConfig("dnn-baseline", "seed DNN baseline: flattened input, no hidden layer, 5 epochs",
                   "dnn", {}, epochs=5, learning_rate=1e-4, weight_decay=0.0),
    TrainingConfig("dnn-hidden", "seed DNN tuned: two hidden layers (128, 64)",
                   "dnn", {"hidden": (128, 64)}, epochs=5, learning_rate=1e-4, weight_decay=0.0),
    TrainingConfig("dnn-hidden-more-epochs", "seed DNN tuned: hidden layers, 15 epochs",
                   "dnn", {"hidden": (128, 64)}, epochs=15, learning_rate=1e-4, weight_decay=0.0),
    TrainingConfig("dnn-hidden-dropout", "seed DNN tuned: hidden layers, dropout 0.5, 15 epochs",
                   "dnn", {"hidden": (128, 64), "dropout": 0.5}, epochs=15, learning_rate=1e-4,
                   weight_decay=0.0),
    TrainingConfig("seed-cnn-initial", "seed initial CNN: 3 conv + 3 pool + flatten + dense, 10 epochs",
                   "seed_cnn", {}, epochs=10, learning_rate=1e-3, weight_decay=0.0),
    TrainingConfig("seed-cnn-final", "seed final CNN: with dropout 0.5, fewer epochs (5)",
                   "seed_cnn", {"dropout": 0.5}, epochs=5, learning_rate=1e-3, weight_decay=0.0),
    TrainingConfig("pacs-cnn", "our CNN: BN blocks, global pooling, dropout, augmentation, "
                   "class-balanced loss, AdamW + one-cycle schedule",
                   "pacs_cnn", {}, epochs=16, batch_size=32, learning_rate=3e-3,
                   weight_decay=1e-4, augment=True, balance_classes=True),
    TrainingConfig("pacs-cnn-lowres", "our CNN on a 100x100 average-pooled input, the old "
                   "augmentation (ablation: resolution alone)",
                   "pacs_cnn", {"downsample": 2}, epochs=16, batch_size=32, learning_rate=3e-3,
                   weight_decay=1e-4, augment=True, balance_classes=True),
    TrainingConfig("pacs-cnn-robust", "our CNN on a 100x100 average-pooled input, trained on "
                   "films shifted before equalisation (field of view 0.6-1.3, black/white/mirrored "
                   "borders, aspect, rotation, gamma, blur/unsharp, noise, burned-in markers), "
                   "class-balanced loss, AdamW + one-cycle schedule",
                   "pacs_cnn", {"downsample": 2}, epochs=16, batch_size=32, learning_rate=3e-3,
                   weight_decay=1e-4, augment_pictures=True, balance_classes=True),
    TrainingConfig("smoke", "tiny smoke run for tests: one short epoch",
                   "pacs_cnn", {"widths": (4, 8, 8)}, epochs=1, batch_size=8, augment=True,
                   balance_classes=True),
    TrainingConfig("smoke-robust", "tiny smoke run of the robust recipe for tests",
                   "pacs_cnn", {"widths": (4, 8, 8), "downsample": 2}, epochs=1, batch_size=8,
                   augment_pictures=True, balance_classes=True),
]}


def build_network(config: TrainingConfig) -> nn.Module:
    return BUILDERS[config.build](**config.build_args)
