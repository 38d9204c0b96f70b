"""Export a trained network as a model file that honours the pacs_ai contract."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from pacs_ai.model.model import EXPECTED_INPUT_SHAPE, FORMAT_ID, METADATA_FILE, PneumoniaModel
from pacs_ai.model.preprocessing import PREPROCESSING_ID


def git_commit() -> str:
    """The training code's commit (with '-dirty' when uncommitted changes exist), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "pacs_ai"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def build_metadata(*, name: str, version: str, threshold: float, threshold_rule: str,
                   output: str = "logit", **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "format": FORMAT_ID,
        "name": name,
        "version": version,
        "classes": ["normal", "pneumonia"],
        "positive_class": "pneumonia",
        "input": {"shape": EXPECTED_INPUT_SHAPE, "dtype": "float32",
                  "preprocessing": PREPROCESSING_ID},
        "output": output,
        "threshold": float(threshold),
        "threshold_rule": threshold_rule,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    metadata.update(extra)
    return metadata


def export_model(network: torch.nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Script (or trace) the network, save it with its metadata, and reload it through the
    service's own loader so a file that breaks the contract is never written silently."""
    network = network.eval()
    try:
        scripted = torch.jit.script(network)
    except Exception:  # some layers do not script; tracing is exact for these static CNNs
        example = torch.zeros(1, *EXPECTED_INPUT_SHAPE)
        scripted = torch.jit.trace(network, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(path),
                   _extra_files={METADATA_FILE: json.dumps(metadata, indent=2, sort_keys=True)})
    PneumoniaModel.load(path)
    return path
