"""What the gate lets through and what it stops, on everything the project has or can make.

`python -m training gate-check --runs runs/gate/s0 runs/gate/s1 runs/gate/s2 --out DIR`
(or `--model FILE` for a model file's own gate) writes DIR/gate.json and DIR/gate.md:

- children's validation films (the classifier's split): unshifted and under every stress
  condition of training.shifts — these set the threshold (training.gate.GATE_THRESHOLD_RULE),
  and each condition's abstention is reported;
- adult validation films (split by patient, never trained on): unshifted and under the same
  conditions, so a frame, a crop or another processing does not let an adult through;
- children's and adult validation films under processing no training or threshold saw
  (training.unseen_processing: histogram equalisation, CLAHE-like local contrast, large-kernel
  enhancement, a narrow window, JPEG): a stand-in for hospitals the project has no films of;
- style swapped both ways (training.gate.restyle at strength 1: children processed like the
  adult hospital's films, adults like the children's), to see whether the gate keys on look;
- heavy shifts of both (inverted, turned 90 degrees, upside down) and made-up pictures (noise,
  gradients, chequerboards, text pages: training.abstention.synthetic_pictures, other seeds than
  training's) and CT-like slices;
- the 40 full-resolution originals of training films, and the sample DICOM films.
Nothing here reads a test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pacs_ai.model.preprocessing import to_model_input
from training.data import DEFAULT_CACHE_DIR
from training.shifts import CONDITIONS
from training.stress import cached_shifted_inputs, read_picture

Score = Callable[[np.ndarray], np.ndarray]  # model inputs [N, 1, 200, 200] -> scores [N]


def _inputs_of(pictures: list[np.ndarray]) -> np.ndarray:
    return np.stack([to_model_input(p) for p in pictures]).astype(np.float32)


def _scores(score: Score, inputs: np.ndarray, batch: int = 128) -> np.ndarray:
    return np.concatenate([score(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


def _restyled_inputs(paths: list[Path], towards: np.ndarray) -> np.ndarray:
    from training.data import PICTURE_SIZE
    from training.gate import restyle

    pictures = []
    for path in paths:
        picture = read_picture(path)
        if picture.shape != (PICTURE_SIZE, PICTURE_SIZE):
            from PIL import Image
            picture = np.asarray(Image.fromarray(picture, mode="F").resize(
                (PICTURE_SIZE, PICTURE_SIZE)), dtype=np.float32)
        pictures.append(picture)
    values = restyle(torch.from_numpy(np.stack(pictures)), torch.from_numpy(towards),
                     torch.ones(len(pictures)))
    return _inputs_of(list(values.numpy()))


def check_sets(score: Score, children: list[Path], adults: list[Path],
               styles: dict[str, np.ndarray], samples: Path | None,
               originals: Path | None) -> dict[str, dict]:
    """Scores of every check set: name -> {set, side ('in' must pass, 'out' must abstain),
    count, scores}."""
    from training.abstention import HEAVY_SHIFTS, sample_dicom_inputs, synthetic_pictures
    from training.gate import ct_like_slice
    from training.unseen_processing import UNSEEN_PROCESSING

    table: dict[str, dict] = {}

    def add(name: str, kind: str, side: str, inputs: np.ndarray, what: str) -> None:
        table[name] = {"set": kind, "side": side, "count": int(len(inputs)), "what": what,
                       "scores": _scores(score, inputs)}

    for condition in CONDITIONS:
        add(f"children {condition.name}", "children's validation films", "in",
            cached_shifted_inputs(children, condition, DEFAULT_CACHE_DIR), condition.description)
    for condition in CONDITIONS:
        add(f"adults {condition.name}", "adult validation films", "out",
            cached_shifted_inputs(adults, condition, DEFAULT_CACHE_DIR), condition.description)
    for condition in UNSEEN_PROCESSING:  # set on nothing: the stand-in for other hospitals
        add(f"children {condition.name}", "processing never trained on", "in",
            cached_shifted_inputs(children, condition, None), condition.description)
        add(f"adults {condition.name}", "processing never trained on", "out",
            cached_shifted_inputs(adults, condition, None), condition.description)
    towards_adults = styles["adults"] - styles["children"]
    add("children restyled as adults", "style swap", "in",
        _restyled_inputs(children, towards_adults),
        "children's films given the adult films' mean spectrum (processing)")
    add("adults restyled as children", "style swap", "out",
        _restyled_inputs(adults, -towards_adults),
        "adult films given the children's films' mean spectrum (processing)")
    for condition in HEAVY_SHIFTS:
        if condition.name in ("inverted", "rotated-90", "upside-down"):
            add(f"children {condition.name}", "wrongly displayed", "out",
                cached_shifted_inputs(children, condition, None), condition.description)
            add(f"adults {condition.name}", "wrongly displayed", "out",
                cached_shifted_inputs(adults, condition, None), condition.description)
    for name, pictures in synthetic_pictures(seed=1000).items():
        add(f"made-up {name}", "not a radiograph", "out", _inputs_of(pictures), name)
    rng = np.random.default_rng(1000)
    add("made-up ct-slice", "not a radiograph", "out",
        _inputs_of([ct_like_slice(rng) for _ in range(20)]), "CT-like axial slices")
    if originals is not None and originals.is_dir():
        files = sorted(p for p in originals.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
        add("originals full resolution", "training films at full resolution", "in",
            _inputs_of([read_picture(p) for p in files]), "shared/data/originals")
    if samples is not None and samples.is_dir():
        inputs = sample_dicom_inputs(samples)
        chest = [v for k, v in inputs.items() if "ct_" not in k]
        ct = [v for k, v in inputs.items() if "ct_" in k]
        add("sample DICOM chest films", "sample DICOM", "in", np.stack(chest),
            "sample_dicoms/ films of every transfer syntax (the lateral and abdomen ones are "
            "chest films relabelled: their header filters skip them)")
        if ct:
            add("sample DICOM CT slice", "sample DICOM", "out", np.stack(ct),
                "sample_dicoms/skip_ct_chest_slice.dcm (ellipse phantom)")
    return table


def summarise(table: dict[str, dict], threshold: float) -> dict[str, dict]:
    rows = {}
    for name, row in table.items():
        scores = np.asarray(row["scores"])
        rows[name] = {key: row[key] for key in ("set", "side", "count", "what")}
        rows[name]["abstained"] = float((scores > threshold).mean())
        rows[name]["median_score"] = float(np.median(scores))
    return rows


def markdown(rows: dict[str, dict], threshold: float, label: str) -> str:
    lines = [f"{label}: gate threshold {threshold:.4f}", "",
             "| films | must | count | abstained | median score | what |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        must = "pass" if row["side"] == "in" else "abstain"
        lines.append(f"| {name} | {must} | {row['count']} | {row['abstained']:.1%} | "
                     f"{row['median_score']:.3f} | {row['what']} |")
    return "\n".join(lines) + "\n"
