"""Loading a model file and checking it against the contract (see docs/architecture.md).

A model file is TorchScript saved with an extra file ``pacs_ai.json`` holding its metadata.
Input: float32 [N, 1, 200, 200] from :func:`pacs_ai.model.preprocessing.to_model_input`.
Output: [N] logits or probabilities of class "pneumonia", as ``output`` in the metadata says.

Optional (model files from `python -m training ensemble`): a method ``forward_with_ood`` giving
the same [N] output and [N] out-of-distribution scores from one pass, with ``ood.threshold`` in
the metadata. A film scoring above it is one the model abstains on (``abstain_reason``): it is
unlike the films the model was trained on, so no finding is sent. Files without it keep working.
From 1.3.0 that score is a gate's (metadata ``ood.score`` "gate": a trained network's probability
that the film is no young child's frontal chest film, training/gate.py); the contract is the same.

Contract version 2 (``format`` "pacs-ai-model/2", from model 1.2.1): everything of version 1,
plus an optional method ``saliency`` ([N, 1, 200, 200] -> [N, G, G] saliency maps over the input,
>= 0; run with gradients enabled) described by metadata ``saliency`` ({"method": ..., "grid":
[G, G]}), and optionally ``forward_with_ood_and_saliency`` giving forward_with_ood's outputs and
the maps from one pass (the service then computes maps at almost no cost; the outputs must be
those of forward_with_ood). The service outlines the region the map names in the report and
draws the heat-map image from it (pacs_ai.model.heatmap). Version 1 files, and version 2 files
without ``saliency``, keep working without maps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.config import MAX_AGE_YEARS, default_model_path
from pacs_ai.errors import UserError
from pacs_ai.finding import Finding
from pacs_ai.model.preprocessing import MODEL_INPUT_SIZE, PREPROCESSING_ID

METADATA_FILE = "pacs_ai.json"
FORMAT_ID = "pacs-ai-model/2"  # what `python -m training` writes
SUPPORTED_FORMATS = ("pacs-ai-model/1", FORMAT_ID)  # 1: no saliency method
MAX_SALIENCY_GRID = 64  # a map is a small grid over the input, never a full-resolution copy
EXPECTED_INPUT_SHAPE = [1, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE]
REQUIRED_KEYS = ("format", "name", "version", "classes", "positive_class", "input", "output",
                 "threshold")


class ModelContractError(UserError):
    """The model file is missing, unreadable or does not match the contract."""


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the service needs to know about a loaded model."""

    name: str
    version: str
    threshold: float
    output_kind: str  # "logit" or "probability"
    metadata: dict[str, Any]
    ood_threshold: float | None = None  # abstain above this out-of-distribution score
    # The population the model is for, from metadata "intended_use" (None: not stated).
    # Ages in years, [min, max]: a patient is in range when min <= age < max + 1, so [1, 5]
    # takes a child of 5 years 11 months and not one of 6 months. The service replaces this and
    # `threshold` with the site's values where [model] overrides them
    # (pacs_ai.model.intended_use.site_model_info); the file's own stay in `metadata`.
    intended_age_years: tuple[float, float] | None = None
    intended_views: tuple[str, ...] | None = None
    saliency_grid: tuple[int, int] | None = None  # the map's shape, when the model gives one

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


def validate_metadata(metadata: Any) -> ModelInfo:
    """Check metadata against the contract; raise ModelContractError naming what is wrong."""
    if not isinstance(metadata, dict):
        raise ModelContractError("model metadata is not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ModelContractError(f"model metadata lacks required keys: {', '.join(missing)}")
    if metadata["format"] not in SUPPORTED_FORMATS:
        raise ModelContractError(
            f"model format {metadata['format']!r} is not supported (expected one of "
            f"{', '.join(repr(f) for f in SUPPORTED_FORMATS)})")
    model_input = metadata["input"]
    shape = model_input.get("shape") if isinstance(model_input, dict) else None
    if shape != EXPECTED_INPUT_SHAPE:
        raise ModelContractError(
            f"model expects input shape {shape}, but this service produces {EXPECTED_INPUT_SHAPE}")
    preprocessing = model_input.get("preprocessing")
    if preprocessing != PREPROCESSING_ID:
        raise ModelContractError(
            f"model was trained with preprocessing {preprocessing!r}, this service provides "
            f"{PREPROCESSING_ID!r}")
    if metadata["output"] not in ("logit", "probability"):
        raise ModelContractError(
            f"model output kind {metadata['output']!r} must be 'logit' or 'probability'")
    if metadata["positive_class"] != "pneumonia" or "pneumonia" not in metadata["classes"]:
        raise ModelContractError("model must output the probability of class 'pneumonia'")
    threshold = metadata["threshold"]
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ModelContractError(f"model threshold {threshold!r} must be a number in [0, 1]")
    age_years, views = _intended_use(metadata.get("intended_use"))
    return ModelInfo(name=str(metadata["name"]), version=str(metadata["version"]),
                     threshold=float(threshold), output_kind=metadata["output"],
                     metadata=metadata, intended_age_years=age_years, intended_views=views,
                     ood_threshold=_ood_threshold(metadata),
                     saliency_grid=_saliency_grid(metadata))


def _saliency_grid(metadata: dict[str, Any]) -> tuple[int, int] | None:
    saliency = metadata.get("saliency")
    if saliency is None:
        return None
    if metadata["format"] == "pacs-ai-model/1":
        raise ModelContractError("model metadata 'saliency' needs format 'pacs-ai-model/2'")
    grid = saliency.get("grid") if isinstance(saliency, dict) else None
    if (not isinstance(grid, list) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool)
                       and 2 <= v <= MAX_SALIENCY_GRID for v in grid)):
        raise ModelContractError(f"model metadata 'saliency.grid' must be [rows, columns] "
                                 f"between 2 and {MAX_SALIENCY_GRID}, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _ood_threshold(metadata: dict[str, Any]) -> float | None:
    ood = metadata.get("ood")
    if ood is None:
        return None
    threshold = ood.get("threshold") if isinstance(ood, dict) else None
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold <= 0:
        raise ModelContractError(f"model metadata 'ood.threshold' must be a positive number, "
                                 f"got {threshold!r}")
    return float(threshold)


def _intended_use(intended_use: Any) -> tuple[tuple[float, float] | None, tuple[str, ...] | None]:
    """(age range, views) from the optional "intended_use" object, e.g.
    {"age_years": [1, 5], "views": ["PA", "AP"]}; either key may be absent."""
    if intended_use is None:
        return None, None
    if not isinstance(intended_use, dict):
        raise ModelContractError("model intended_use must be a JSON object such as "
                                 '{"age_years": [1, 5], "views": ["PA", "AP"]}')
    age_years = intended_use.get("age_years")
    if age_years is not None:
        if (not isinstance(age_years, list) or len(age_years) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in age_years)
                or not 0 <= age_years[0] <= age_years[1] <= MAX_AGE_YEARS):
            raise ModelContractError(f"model intended_use age_years {age_years!r} must be "
                                     f"[min, max] in years with 0 <= min <= max <= {MAX_AGE_YEARS}")
        age_years = (float(age_years[0]), float(age_years[1]))
    views = intended_use.get("views")
    if views is not None:
        if not isinstance(views, list) or not all(isinstance(v, str) for v in views):
            raise ModelContractError(f"model intended_use views {views!r} must be a list of "
                                     'View Position values such as ["PA", "AP"]')
        views = tuple(v.strip().upper() for v in views)
    return age_years, views


class PneumoniaModel:
    """A loaded, validated TorchScript model: batches of model input in, probabilities out."""

    def __init__(self, module: Any, info: ModelInfo, path: Path, sha256: str | None = None):
        self.module = module
        self.info = info
        self.path = path
        # SHA-256 of the bytes loaded: which file this is, exactly (a site threshold names it,
        # pacs_ai.model.site_threshold; the shadow's results carry it)
        self.sha256 = sha256

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> "PneumoniaModel":
        import torch

        model_path = Path(path) if path is not None else default_model_path()
        if not model_path.is_file():
            raise ModelContractError(f"model file not found: {model_path}"
                                     if not model_path.exists()
                                     else f"model file is not a file: {model_path}")
        extra_files = {METADATA_FILE: ""}
        try:
            # read once: the digest is of the very bytes loaded, even if the file is replaced
            data = model_path.read_bytes()
        except OSError as error:
            raise ModelContractError(f"cannot read model file {model_path}: "
                                     f"{error.strerror}") from None
        if not data:  # torch would say "istream reader failed: getting the current position"
            raise ModelContractError(f"model file is empty: {model_path} (0 bytes; a copy that "
                                     "did not finish?)")
        try:
            with warnings.catch_warnings():  # TorchScript is our contract; keep the logs clean
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(io.BytesIO(data), map_location="cpu",
                                        _extra_files=extra_files)
        except Exception as error:  # torch raises RuntimeError/ValueError/zip errors alike
            raise ModelContractError(
                f"{model_path} is not a TorchScript model file: {error}") from None
        raw = extra_files[METADATA_FILE]
        if not raw:
            raise ModelContractError(
                f"{model_path} has no {METADATA_FILE} metadata; export it with "
                "`python -m training export` so the service knows its threshold and input")
        try:
            metadata = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ModelContractError(f"{model_path}: metadata is not valid JSON: {error}") from None
        info = validate_metadata(metadata)
        if info.ood_threshold is not None and not hasattr(module, "forward_with_ood"):
            raise ModelContractError(f"{model_path}: metadata has an 'ood' threshold but the "
                                     "model has no forward_with_ood method")
        if info.saliency_grid is not None and not hasattr(module, "saliency"):
            raise ModelContractError(f"{model_path}: metadata has 'saliency' but the model has "
                                     "no saliency method")
        module.eval()
        model = cls(module, info, model_path, hashlib.sha256(data).hexdigest())
        del data
        model._check_runs()
        return model

    def _check_runs(self) -> None:
        """Run one blank image so a shape mismatch shows at load time, not on the first patient."""
        blank = np.full((1, *EXPECTED_INPUT_SHAPE), 0.5, dtype=np.float32)
        try:
            probabilities = self.predict(blank)
        except Exception as error:
            raise ModelContractError(
                f"{self.path}: model failed on a [1, 1, 200, 200] input: {error}") from None
        if probabilities.shape != (1,):
            raise ModelContractError(
                f"{self.path}: model output has shape {probabilities.shape}, expected [N]")
        if self.has_saliency:
            try:
                maps = self._raw_saliency(blank)
            except Exception as error:
                raise ModelContractError(
                    f"{self.path}: saliency failed on a [1, 1, 200, 200] input: {error}") from None
            if maps.shape != (1, *self.info.saliency_grid):
                raise ModelContractError(
                    f"{self.path}: saliency has shape {list(maps.shape)}, metadata says "
                    f"[N, {self.info.saliency_grid[0]}, {self.info.saliency_grid[1]}]")

    @property
    def has_saliency(self) -> bool:
        """Whether the model gives saliency maps (contract version 2 with ``saliency``)."""
        return self.info.saliency_grid is not None

    def saliency(self, batch: np.ndarray) -> list[np.ndarray | None]:
        """Per film of a float32 batch [N, 1, 200, 200]: its map as a small grid scaled to
        [0, 1] (float16, pacs_ai.model.heatmap.normalised), or None when the map is flat (nothing to
        outline). Raises when the model has no saliency method."""
        from pacs_ai.model.heatmap import normalised

        if not self.has_saliency:
            raise ValueError(f"{self.info.label} gives no saliency maps")
        return [normalised(grid) for grid in self._raw_saliency(batch)]

    def assess_with_saliency(self, batch: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray | None]]:
        """assess() and saliency() of a batch, from one pass when the model has
        ``forward_with_ood_and_saliency`` (the same numbers as the two calls)."""
        import torch

        if not (self.has_saliency and self.info.ood_threshold is not None
                and hasattr(self.module, "forward_with_ood_and_saliency")):
            probabilities, scores = self.assess(batch)
            return probabilities, scores, self.saliency(batch)
        from pacs_ai.model.heatmap import normalised

        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.enable_grad():
            output, ood, maps = self.module.forward_with_ood_and_saliency(tensor)
        output = output.detach().reshape(-1)
        if self.info.output_kind == "logit":
            output = torch.sigmoid(output)
        return (output.double().numpy(), ood.detach().reshape(-1).double().numpy(),
                [normalised(grid) for grid in maps.detach().float().numpy()])

    def _raw_saliency(self, batch: np.ndarray) -> np.ndarray:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.enable_grad():  # Grad-CAM needs them; the caller may be in no_grad
            maps = self.module.saliency(tensor)
        return maps.detach().float().numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of pneumonia, shape [N], for a float32 batch [N, 1, 200, 200]."""
        return self.assess(batch)[0]

    def assess(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities [N], out-of-distribution scores [N] or None when the model has none)
        for a float32 batch [N, 1, 200, 200], from one pass through the network."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        scores = None
        with torch.inference_mode():
            if self.info.ood_threshold is not None:
                output, ood = self.module.forward_with_ood(tensor)
                scores = ood.reshape(-1).double().numpy()
            else:
                output = self.module(tensor)
        output = output.reshape(-1)
        if self.info.output_kind == "logit":
            output = torch.sigmoid(output)
        return output.double().numpy(), scores

    def abstain_reason(self, ood_score: float | None) -> str | None:
        """'out-of-distribution: ...' when the film is unlike the training films, else None."""
        if ood_score is None or self.info.ood_threshold is None:
            return None
        if ood_score <= self.info.ood_threshold:
            return None
        if self.info.metadata.get("ood", {}).get("score") == "gate":
            # a probability that the film is no young child's frontal chest film
            return (f"out-of-distribution: gate score {ood_score:.4f} above "
                    f"{self.info.ood_threshold:.4f}; not recognised as a young child's frontal "
                    "chest film, the model's intended use")
        return (f"out-of-distribution: score {ood_score:.2f} above {self.info.ood_threshold:.2f}; "
                "the film is unlike those the model was trained on")

    def finding(self, probability: float) -> Finding:
        """Pneumonia at or above the threshold in force, else normal."""
        return Finding.at(probability, self.info.threshold)
