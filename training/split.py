"""A validation split carved out of train/, grouped by patient, duplicates kept together.

Groups: images of one patient (file-name key) and byte-identical files (same md5) are merged with
a union-find, so no patient and no duplicated picture sits on both sides. Groups are shuffled with
a seed and taken per class until the validation share is reached. The split is saved as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.data import ImageSet


def group_ids(images: ImageSet) -> np.ndarray:
    """A group number per image: same patient or same bytes -> same group."""
    parent = list(range(len(images)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    for index, key in enumerate([f"p:{p}" for p in images.patients]
                                + [f"d:{d}" for d in images.digests]):
        image_index = index % len(images)
        if key in first_seen:
            parent[find(image_index)] = find(first_seen[key])
        else:
            first_seen[key] = image_index
    return np.array([find(i) for i in range(len(images))])


def make_split(images: ImageSet, validation_fraction: float = 0.15,
               seed: int = 0) -> dict[str, list[int]]:
    """Indices of train and validation images; each class gets about the same validation share."""
    groups = group_ids(images)
    rng = np.random.default_rng(seed)
    validation: list[int] = []
    for label in (0, 1):
        # a group's class is the majority class of its images (groups are nearly always pure)
        label_groups = sorted({g for g, y in zip(groups, images.labels) if y == label})
        rng.shuffle(label_groups)
        target = validation_fraction * int((images.labels == label).sum())
        taken = 0
        for group in label_groups:
            if taken >= target:
                break
            members = [i for i in np.flatnonzero(groups == group) if i not in validation]
            validation += members
            taken += sum(images.labels[i] == label for i in members)
    validation_set = set(validation)
    train = [i for i in range(len(images)) if i not in validation_set]
    return {"train": train, "validation": sorted(validation_set)}


def save_split(split: dict[str, list[int]], images: ImageSet, path: Path, seed: int) -> None:
    record = {
        "seed": seed,
        "rule": "grouped by patient key and by md5 (union-find), per-class share, seeded shuffle",
        "train": [images.paths[i].name for i in split["train"]],
        "validation": [images.paths[i].name for i in split["validation"]],
    }
    Path(path).write_text(json.dumps(record, indent=1))
