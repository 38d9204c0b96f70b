"""Offline classification of files: DICOM, PNG or JPEG in, one result dict per file out.

The service's per-film step (`pacs_ai.film.film_input.prepare`) and the model, without the network,
in batches. Used by `pacs-ai classify` and `pacs-ai evaluate` (pacs_ai/commands) and by
`python -m training evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.config import DEFAULT_MAX_PIXELS, FilterPolicy
from pacs_ai.film.film_input import Prepared, prepare
from pacs_ai.model.model import PneumoniaModel

BATCH_SIZE = 32
# Files a folder walk passes over: documentation and listings next to images (a README.md,
# a manifest.json). A file named on the command line is always read.
NOT_IMAGE_SUFFIXES = {".md", ".json", ".txt", ".csv", ".html", ".pdf", ".py", ".toml"}


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, and the image candidates under a folder, in sorted order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file()
                              and not p.name.startswith(".")
                              and p.suffix.lower() not in NOT_IMAGE_SUFFIXES)
        else:
            yield path


def classify_files(paths: Iterable[str | Path], model: PneumoniaModel,
                   policy: FilterPolicy = FilterPolicy(),
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict[str, Any]]:
    """One result dict per file, in input order, classifying in batches."""
    pending: list[Prepared] = []
    for path in expand_paths(paths):
        pending.append(prepare(path, policy, max_pixels))
        if sum(p.model_input is not None for p in pending) >= BATCH_SIZE:
            yield from _finish(pending, model)
            pending = []
    yield from _finish(pending, model)


def _finish(pending: list[Prepared], model: PneumoniaModel) -> Iterator[dict[str, Any]]:
    ready = [p for p in pending if p.model_input is not None]
    probabilities, ood_scores = (model.assess(np.stack([p.model_input for p in ready]))
                                 if ready else ([], None))
    by_path = dict(zip((id(p) for p in ready), probabilities))
    ood_by_path = dict(zip((id(p) for p in ready), ood_scores)) if ood_scores is not None else {}
    model_label = {"name": model.info.name, "version": model.info.version}
    for item in pending:
        result: dict[str, Any] = {"path": str(item.path), "status": item.status,
                                  "probability": None, "finding": None,
                                  "threshold": model.info.threshold, "model": model_label}
        if item.model_input is not None:  # whether the age check could apply: false for a
            result["age_known"] = item.age_known  # PNG/JPEG or a header without a usable age
        if item.model_input is not None:
            probability = float(by_path[id(item)])
            result["probability"] = round(probability, 6)
            if id(item) in ood_by_path:
                score = float(ood_by_path[id(item)])
                result["ood_score"] = round(score, 4)
                abstain = model.abstain_reason(score)
                if abstain:  # the model's probability is shown, but no finding
                    result.update(status="skipped", reason=abstain)
                    yield result
                    continue
            result["finding"] = model.finding(probability)
        else:
            result["reason"] = item.reason
        yield result
