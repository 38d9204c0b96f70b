"""Chest X-ray folders in the Kaggle/Mendeley layout -> cached model inputs.

Layout: ROOT/{train,val[,test]}/{NORMAL,PNEUMONIA}/*.jpeg. Every image is read as grayscale and
sent through the service's own preprocessing function once; the stacked results are cached as a
.npy file keyed by the file list and the preprocessing id, so later runs start in seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pacs_ai.model.preprocessing import MODEL_INPUT_SIZE, PREPROCESSING_ID, to_model_input

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "training"

_PNEUMONIA_PATIENT = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_PATIENT = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)
_NIH_PATIENT = re.compile(r"^(\d{8})_\d+\.")  # NIH ChestX-ray14: patient _ follow-up


@dataclass
class ImageSet:
    """Images of one split, preprocessed: inputs [N, 200, 200] float16, labels [N] (1 = pneumonia)."""

    paths: list[Path]
    labels: np.ndarray
    patients: list[str]
    digests: list[str]
    inputs: np.ndarray
    # the films' own grey levels, uint8 [N, PICTURE_SIZE, PICTURE_SIZE], for augmentation before
    # the preprocessing (load_pictures); None when a recipe does not need them
    pictures: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray | list[int]) -> "ImageSet":
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet([self.paths[i] for i in indices], self.labels[indices],
                        [self.patients[i] for i in indices], [self.digests[i] for i in indices],
                        self.inputs[indices],
                        None if self.pictures is None else self.pictures[indices])


def patient_of(path: Path) -> str:
    """Patient key from the file name: personNNN for pneumonia, IM-XXXX for normal films,
    nih:NNNNNNNN for the adult NIH films (shared/data/adults_nih)."""
    name = path.name
    match = _PNEUMONIA_PATIENT.match(name) or _NORMAL_PATIENT.match(name)
    if match:
        return match.group(1).lower()
    nih = _NIH_PATIENT.match(name)
    return f"nih:{nih.group(1)}" if nih else f"file:{name.lower()}"


def list_split(root: Path, split: str) -> list[tuple[Path, int]]:
    """(path, label) for every image of ROOT/split, sorted for reproducibility."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist (expected the Kaggle chest_xray layout)")
    items = []
    for label, class_name in enumerate(CLASSES):
        class_dir = split_dir / class_name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"{class_dir} does not exist")
        items += [(p, label) for p in sorted(class_dir.iterdir())
                  if p.suffix.lower() in IMAGE_SUFFIXES]
    return items


def load_split(root: Path, split: str, cache_dir: Path = DEFAULT_CACHE_DIR,
               limit_per_class: int | None = None, progress: bool = True,
               names: set[str] | None = None) -> ImageSet:
    """Read, preprocess and cache one split. limit_per_class keeps the first N of each class;
    names keeps only those file names (a run's split.json)."""
    items = list_split(root, split)
    if names is not None:
        items = [item for item in items if item[0].name in names]
    if limit_per_class is not None:
        items = [it for label in (0, 1) for it in [i for i in items if i[1] == label][:limit_per_class]]
    paths = [p for p, _ in items]
    labels = np.array([label for _, label in items], dtype=np.int64)
    digests = [hashlib.md5(p.read_bytes()).hexdigest() for p in paths]
    key = hashlib.sha256(json.dumps([PREPROCESSING_ID, [p.name for p in paths], digests])
                         .encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"{split}-{key}.npy"
    if cache_file.is_file():
        inputs = np.load(cache_file, mmap_mode="r")
    else:
        inputs = np.empty((len(paths), MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), dtype=np.float16)
        iterator = _progress(paths, f"preprocessing {split}", progress)
        for index, path in enumerate(iterator):
            with Image.open(path) as picture:
                inputs[index] = to_model_input(np.asarray(picture.convert("L")))[0]
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(".tmp.npy")
        np.save(temporary, inputs)
        temporary.rename(cache_file)
    return ImageSet(paths, labels, [patient_of(p) for p in paths], digests, np.asarray(inputs))


PICTURE_SIZE = 224  # the shared copies' size; other sources are squashed to it, as the service does


def load_pictures(images: ImageSet, cache_dir: Path = DEFAULT_CACHE_DIR,
                  progress: bool = True) -> ImageSet:
    """The same images with their grey levels attached (uint8, squashed to PICTURE_SIZE), cached
    like the inputs: augmentation that changes the field of view, borders or texture must act
    before the rank equalisation, as a site's different film would."""
    key = hashlib.sha256(json.dumps(["pictures", PICTURE_SIZE, [p.name for p in images.paths],
                                     images.digests]).encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"pictures-{key}.npy"
    if cache_file.is_file():
        pictures = np.load(cache_file, mmap_mode="r")
    else:
        pictures = np.empty((len(images), PICTURE_SIZE, PICTURE_SIZE), dtype=np.uint8)
        for index, path in enumerate(_progress(images.paths, "reading pictures", progress)):
            with Image.open(path) as picture:
                grey = picture.convert("L")
                if grey.size != (PICTURE_SIZE, PICTURE_SIZE):
                    grey = grey.resize((PICTURE_SIZE, PICTURE_SIZE), Image.Resampling.BILINEAR)
                pictures[index] = np.asarray(grey)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(".tmp.npy")
        np.save(temporary, pictures)
        temporary.rename(cache_file)
    return ImageSet(images.paths, images.labels, images.patients, images.digests, images.inputs,
                    np.asarray(pictures))


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, unit="img", mininterval=2.0)
