"""How often a model file abstains (out-of-distribution), on what the project has or can make.

`python -m training abstention --model FILE --out DIR`

Sets, each through the model-file contract:
- the validation split as it is (the threshold is set so that about 1.5 % abstain there);
- the validation split under each stress condition (training.shifts) and under heavy shifts
  that no site should send as a frontal chest film: inverted grey levels (a MONOCHROME1 film
  read as MONOCHROME2), rotated 90 degrees, upside down, a 35 % crop, a 40 % frame;
- the project's sample DICOM films, decoded as the service does (header filters bypassed), by
  file: the chest films must pass, the synthetic CT slice must not;
- the 40 full-resolution originals of training films (in distribution, another resolution);
- synthetic non-radiographs: noise, gradients, checkerboards, blank pages with text.
The gate's fuller check, with the adult validation films and restyled films, is
training.gate_check (`python -m training gate-check`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pacs_ai.model.preprocessing import to_model_input
from training.data import DEFAULT_CACHE_DIR
from training.shifts import CONDITIONS, StressCondition, border, crop
from training.stress import cached_shifted_inputs, default_split_file, validation_files

HEAVY_SHIFTS = (
    StressCondition("inverted", "heavy", "grey levels inverted (MONOCHROME1 read as MONOCHROME2)",
                    lambda picture, _rng: 255.0 - picture),
    StressCondition("rotated-90", "heavy", "rotated 90 degrees",
                    lambda picture, _rng: np.rot90(picture).copy()),
    StressCondition("upside-down", "heavy", "upside down",
                    lambda picture, _rng: picture[::-1].copy()),
    StressCondition("crop-tight-35", "heavy", "35 % cut on every side",
                    crop(0.35, 0.35, 0.35, 0.35)),
    StressCondition("border-black-40", "heavy", "40 % black frame on every side",
                    border(0.40, 0.0)),
)


def synthetic_pictures(count: int = 20, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Pictures no chest film looks like, `count` of each kind."""
    rng = np.random.default_rng(seed)
    rows, columns = np.indices((224, 224))
    kinds: dict[str, list[np.ndarray]] = {"noise": [], "gradient": [], "checkerboard": [],
                                          "text-page": []}
    for index in range(count):
        kinds["noise"].append(rng.uniform(0, 255, (224, 224)))
        angle = rng.uniform(0, np.pi)
        kinds["gradient"].append(np.cos(angle) * columns + np.sin(angle) * rows)
        cell = int(rng.integers(4, 40))
        kinds["checkerboard"].append(((rows // cell + columns // cell) % 2) * 255.0)
        page = Image.new("L", (224, 224), 235)
        draw = ImageDraw.Draw(page)
        for line in range(int(rng.integers(4, 14))):
            draw.text((10, 10 + 15 * line), "REPORT " * int(rng.integers(1, 5)), fill=20)
        kinds["text-page"].append(np.asarray(page, dtype=np.float32))
    return {name: [np.asarray(p, dtype=np.float32) for p in pictures]
            for name, pictures in kinds.items()}


def sample_dicom_inputs(folder: Path) -> dict[str, np.ndarray]:
    """Model input of each decodable sample DICOM film, header filters bypassed."""
    import pydicom

    from pacs_ai.film.pixels import PixelDataError, display_array

    inputs = {}
    for path in sorted(folder.glob("*.dcm")):
        try:
            dataset = pydicom.dcmread(path)
            inputs[path.name] = to_model_input(display_array(dataset))
        except (PixelDataError, Exception):  # broken samples: nothing to assess
            continue
    return inputs


def run_abstention(model_path: Path, data: Path, out: Path, samples: Path,
                   originals: Path | None) -> dict:
    from pacs_ai.model.model import PneumoniaModel

    model = PneumoniaModel.load(model_path)
    if model.info.ood_threshold is None:
        raise SystemExit(f"{model_path} has no out-of-distribution score (ood.threshold)")

    def rate(inputs: np.ndarray) -> tuple[float, np.ndarray]:
        scores = np.concatenate([model.assess(inputs[i:i + 64])[1]
                                 for i in range(0, len(inputs), 64)])
        return float((scores > model.info.ood_threshold).mean()), scores

    split_file = default_split_file(model_path)
    if split_file is None:
        raise SystemExit(f"no split file for {model_path}")
    paths, _ = validation_files(split_file, data)
    table: dict[str, dict] = {}
    for condition in (*CONDITIONS, *HEAVY_SHIFTS):
        inputs = cached_shifted_inputs(paths, condition, None if condition.group == "heavy"
                                       else DEFAULT_CACHE_DIR)
        share, scores = rate(inputs)
        table[f"validation {condition.name}"] = {
            "set": "validation" if condition.name == "none" else
            ("heavy shift" if condition.group == "heavy" else "stress shift"),
            "count": len(inputs), "abstained": share, "median_score": float(np.median(scores)),
            "what": condition.description}
    for name, pictures in synthetic_pictures().items():
        share, scores = rate(np.stack([to_model_input(p) for p in pictures]))
        table[f"synthetic {name}"] = {"set": "not a radiograph", "count": len(pictures),
                                      "abstained": share,
                                      "median_score": float(np.median(scores)), "what": name}
    samples_inputs = sample_dicom_inputs(samples)
    for name, model_input in samples_inputs.items():
        share, scores = rate(model_input[np.newaxis])
        table[f"sample {name}"] = {"set": "sample DICOM", "count": 1, "abstained": share,
                                   "median_score": float(scores[0]), "what": name}
    if originals is not None and originals.is_dir():
        files = sorted(p for p in originals.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
        pictures = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) for p in files]
        share, scores = rate(np.stack([to_model_input(p) for p in pictures]))
        table["originals full resolution"] = {
            "set": "training films at full resolution", "count": len(files), "abstained": share,
            "median_score": float(np.median(scores)), "what": "shared/data/originals"}
    summary = {"model": str(model_path), "model_label": model.info.label,
               "ood_threshold": model.info.ood_threshold, "sets": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "abstention.json").write_text(json.dumps(summary, indent=2))
    lines = [f"{model.info.label}: out-of-distribution threshold {model.info.ood_threshold:.3f}",
             "", "| set | films | abstained | median score | what |", "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['count']} | {row['abstained']:.1%} | "
                     f"{row['median_score']:.2f} | {row['what']} |")
    (out / "abstention.md").write_text("\n".join(lines) + "\n")
    return summary
