"""`python -m training explain --model FILE`: is the saliency map faithful? A deletion check.

For each pneumonia film of the model's validation split (never a test split), the region the
service would report (pacs_ai.model.heatmap.region_polygon of the model's own map) is replaced by the
film's mean grey on the film itself, before the preprocessing, as a different film would be; the
film is scored again. The same is done with a region of the same shape and area at a random place
on the film (the polygon moved by a seeded random offset that keeps it inside). A faithful map
names a region whose removal lowers the score more than a random region's does.

Figures: the share of films where the reported region lowers the model's score (its logit:
most pneumonia films' probabilities are within 1e-4 of 1) more than the random one does, and the
median drops of both; over the films the model reports as pneumonia (those
whose SR carries the region) and over all pneumonia films of the split.

With `lungs`, also where the region lies: whether its centre is in the lung fields and what
share of its area is, against a fixed lung-field estimate (training/lung_fields.py, whose
docstring says how it was drawn and its limits), with the random regions as the chance level;
`--out` then also gets lung_fields.png, the fields drawn on the mean of the films checked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pacs_ai.model import heatmap
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.preprocessing import to_model_input
from training.data import list_split
from training.lung_fields import LungCheck, field_shares, lung_figures

BATCH = 32


def validation_pneumonia_films(model_path: Path, data: Path,
                               split_file: Path | None) -> list[Path]:
    """The pneumonia films of the model's validation split (MODEL.split.json beside it, or
    the split.json of its run folder)."""
    if split_file is None:
        for candidate in (model_path.with_suffix(".split.json"), model_path.parent / "split.json"):
            if candidate.is_file():
                split_file = candidate
                break
        else:
            raise SystemExit(f"no split file beside {model_path}; pass --split-file")
    names = set(json.loads(Path(split_file).read_text())["validation"])
    return [path for path, label in list_split(data, "train") if label == 1 and path.name in names]


def occluded(film: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """The film with the polygon's pixels set to the film's mean grey."""
    result = film.astype(np.float32).copy()
    result[heatmap.region_mask(polygon, *film.shape)] = float(film.mean())
    return result


def random_placement(polygon: np.ndarray, rows: int, columns: int,
                     rng: np.random.Generator) -> np.ndarray:
    """The same polygon moved to a random place where it still lies inside the film."""
    low, high = polygon.min(axis=0), polygon.max(axis=0)
    dx = rng.uniform(-low[0], columns - high[0])
    dy = rng.uniform(-low[1], rows - high[1])
    return polygon + np.array([dx, dy])


def run_explain(model_path: Path, data: Path, out: Path | None, split_file: Path | None = None,
                limit: int | None = None, seed: int = 0, start: int = 0,
                lungs: bool = False) -> dict[str, Any]:
    model = PneumoniaModel.load(model_path)
    if not model.has_saliency:
        raise SystemExit(f"{model.info.label} gives no saliency maps (model contract 2 with "
                         "a saliency method); nothing to check")
    paths = validation_pneumonia_films(model_path, data, split_file)
    paths = paths[start:start + limit if limit is not None else None]
    rng = np.random.default_rng(seed)
    lung_check = LungCheck() if lungs else None
    rows_out: list[dict[str, Any]] = []
    started = time.perf_counter()
    for batch_start in range(0, len(paths), BATCH):
        batch_paths = paths[batch_start:batch_start + BATCH]
        films = [np.asarray(Image.open(p).convert("L")) for p in batch_paths]
        inputs = np.stack([to_model_input(f) for f in films])
        probabilities, ood = model.assess(inputs)
        logits = model_scores(model, inputs)
        maps = model.saliency(inputs)
        if lung_check is not None:
            lung_check.add_inputs(inputs)
        variants, meta = [], []
        for path, film, probability, logit, grid, score in zip(
                batch_paths, films, probabilities, logits, maps,
                ood if ood is not None else [None] * len(films)):
            polygon = heatmap.region_polygon(grid) if grid is not None else None
            if polygon is None:
                continue
            rows, columns = film.shape
            region = heatmap.to_film(polygon, grid.shape, rows, columns)
            elsewhere = random_placement(region, rows, columns, rng)
            variants += [to_model_input(occluded(film, region)),
                         to_model_input(occluded(film, elsewhere))]
            meta.append({"file": path.name, "probability": float(probability),
                         "score": float(logit),
                         "reported": model.finding(float(probability)) == "pneumonia"
                         and model.abstain_reason(score) is None,
                         "area_share": heatmap.polygon_area(region) / (rows * columns)})
            if lung_check is not None:
                meta[-1]["lungs"] = lung_check.film(region, elsewhere, rows, columns)
        if not variants:
            continue
        scores = model_scores(model, np.stack(variants))
        for index, row in enumerate(meta):
            row["drop_region"] = row["score"] - float(scores[2 * index])
            row["drop_random"] = row["score"] - float(scores[2 * index + 1])
            rows_out.append(row)
    seconds = time.perf_counter() - started
    summary = {"model": model.info.label, "films": len(paths), "with_region": len(rows_out),
               "first_film": start, "seed": seed, "seconds": round(seconds, 1),
               "region_rule": f"largest 8-connected component of the map (bilinear x"
                              f"{heatmap.REGION_UPSAMPLE}) >= {heatmap.REGION_FRACTION} of its "
                              "maximum, convex hull",
               "reported": _figures([r for r in rows_out if r["reported"]]),
               "all": _figures(rows_out)}
    if lung_check is not None:
        summary["lungs"] = {"estimate": "training/lung_fields.py (fixed polygons)",
                            "fields_share_of_frame": field_shares(),
                            "reported": lung_figures([r for r in rows_out if r["reported"]]),
                            "all": lung_figures(rows_out)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        picture = lung_check.check_picture() if lung_check is not None else None
        if picture is not None:
            picture.save(out / "lung_fields.png")
        (out / "explain.json").write_text(json.dumps({"summary": summary, "films": rows_out},
                                                     indent=1))
    return summary


def model_scores(model: PneumoniaModel, batch: np.ndarray) -> np.ndarray:
    """The model's score before the sigmoid (its logit): the pneumonia films' probabilities
    are mostly within 1e-4 of 1, where a drop in probability says little."""
    import torch

    if model.info.output_kind != "logit":
        probabilities = np.clip(model.predict(batch), 1e-12, 1 - 1e-12)
        return np.log(probabilities / (1 - probabilities))
    with torch.inference_mode():
        return model.module(torch.from_numpy(np.ascontiguousarray(batch))).reshape(-1).double(
        ).numpy()


def _figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"count": 0}
    region = np.array([r["drop_region"] for r in rows])
    random = np.array([r["drop_random"] for r in rows])
    return {"count": len(rows),
            "share_region_drops_more": round(float((region > random).mean()), 4),
            "median_drop_region": round(float(np.median(region)), 4),
            "median_drop_random": round(float(np.median(random)), 4),
            "median_area_share": round(float(np.median([r["area_share"] for r in rows])), 4)}
