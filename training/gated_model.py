"""One model file: an existing classifier (a released ensemble file, weights untouched) behind
a trained gate (training.gate).

`python -m training gated-model --classifier deploy/models/pacs-ai-pneumonia.pt
 --gates runs/gate/s0 runs/gate/s1 runs/gate/s2 --version 1.3.0 --output FILE`

The file keeps the model contract (docs/architecture.md, "The model file"): `forward` and
`saliency` are the classifier's, and `forward_with_ood` / `forward_with_ood_and_saliency` give
the classifier's logits with the gate's score in place of the classifier's own
out-of-distribution score. The threshold is set by training.gate.GATE_THRESHOLD_RULE on the
children's validation films (the classifier's split) and stored as `ood.threshold`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import torch
from torch import nn


class GatedModel(nn.Module):
    """The classifier's outputs; the gate's score as the out-of-distribution score."""

    def __init__(self, classifier: torch.jit.ScriptModule, gates: List[nn.Module]):
        super().__init__()
        self.classifier = classifier
        self.gates = nn.ModuleList(gates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def gate_score(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid of the gate members' mean logit: near 1 = not a young child's frontal chest
        film."""
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        count = 0
        for gate in self.gates:
            total = total + gate(x).reshape(-1)
            count += 1
        return torch.sigmoid(total / count)

    @torch.jit.export
    def forward_with_ood(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.classifier.forward_with_ood(x)
        return logits, self.gate_score(x)

    @torch.jit.export
    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.saliency(x)

    @torch.jit.export
    def forward_with_ood_and_saliency(
            self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, _, maps = self.classifier.forward_with_ood_and_saliency(x)
        with torch.no_grad():
            score = self.gate_score(x)
        return logits, score, maps


def gate_threshold(gates: List[nn.Module], children_paths: List[Path]) -> Tuple[float, dict]:
    """training.gate.GATE_THRESHOLD_RULE over the children's validation films."""
    from training.data import DEFAULT_CACHE_DIR
    from training.gate import gate_scores, threshold_for
    from training.shifts import CONDITIONS
    from training.stress import cached_shifted_inputs

    scores = {c.name: gate_scores(gates, cached_shifted_inputs(children_paths, c, DEFAULT_CACHE_DIR))
              for c in CONDITIONS}
    threshold = threshold_for(scores)
    return threshold, {name: float((values > threshold).mean()) for name, values in scores.items()}


def build_gated_model(classifier_path: Path, gate_runs: List[Path], version: str,
                      output: Path, data: Path, adults: Path) -> dict[str, Any]:
    """Threshold the gate, check the classifier's outputs are untouched, export, and return
    the metadata's ood entry."""
    from pacs_ai.model.model import METADATA_FILE, PneumoniaModel
    from training.export import export_model, git_commit
    from training.gate import (GATE_METHOD, GATE_THRESHOLD_RULE, gate_scores, load_gate_data,
                               load_gate_member)
    from training.stress import default_split_file, validation_files

    source = PneumoniaModel.load(classifier_path)
    split_file = default_split_file(classifier_path)
    if split_file is None:
        raise SystemExit(f"no split file beside {classifier_path}")
    extra = {METADATA_FILE: ""}
    classifier = torch.jit.load(str(classifier_path), map_location="cpu", _extra_files=extra)
    gates = [load_gate_member(run) for run in gate_runs]
    children, _ = validation_files(split_file, data)
    threshold, per_condition = gate_threshold(gates, children)
    data_record, split_record = load_gate_data(split_file, data, adults,
                                               json.loads((gate_runs[0] / "split.json")
                                                          .read_text())["adult_split_seed"])
    adult_scores = gate_scores(gates, data_record.adults_validation.inputs)
    configs = [json.loads((run / "config.json").read_text()) for run in gate_runs]
    ood = {"method": GATE_METHOD, "threshold": threshold, "threshold_rule": GATE_THRESHOLD_RULE,
           "score": "gate", "members": [{"seed": c["seed"], "epochs": c["recipe"]["epochs"]}
                                        for c in configs],
           "train_films": {"children": configs[0]["children_train"],
                           "adults": configs[0]["adults_train"]},
           "validation_abstention": {
               "children_unshifted": per_condition["none"],
               "children_worst_shift": max(per_condition.values()),
               "adults_unshifted": float((adult_scores > threshold).mean())}}
    metadata = dict(source.info.metadata)
    previous = {"version": metadata["version"], "created": metadata.get("created"),
                "change": "the gate (training/gate.py) replaces this classifier file's "
                          "out-of-distribution score; its weights, threshold and saliency kept"}
    metadata.update(version=version, ood=ood, derived_from=previous, git_commit=git_commit())
    network = GatedModel(classifier, gates)
    export_model(network, output, metadata)
    written = PneumoniaModel.load(output)
    probe = np.random.default_rng(0).random((4, 1, 200, 200), dtype=np.float32)
    if not np.array_equal(written.assess(probe)[0], source.assess(probe)[0]):
        raise SystemExit("the gated file's probabilities differ from the classifier's")
    split_target = output.with_suffix(".split.json")
    if split_file.resolve() != split_target.resolve():
        record = json.loads(split_file.read_text())
        record["gate_adults"] = split_record["adults"]
        split_target.write_text(json.dumps(record, indent=1))
    return ood
