"""Where on the film are the lungs? A fixed estimate, to measure how often the heat map's region
lies over them (`python -m training explain --lungs`). Not used by the service.

No lung segmentation model can be fetched here and none ships with the data, and an intensity
rule fails on exactly these films: after the equalisation the air outside the body is as dark
as aerated lung, and consolidated lung, what the map should point at, is bright. So the
estimate is a prior: one polygon per lung field, in fractions of the frame (x from the film's
left edge, y from its top), drawn on the mean model input of the training split's normal films
outside the shipped model's validation split (380 films, every third), where the two lung
fields are the dark lobes between the chest wall and the mediastinum. The model input is the
whole film squashed (pacs_ai.model.preprocessing), so the same fractions hold on the film itself.

Its limits: one shape for every film, so a film framed, rotated or inspired unlike the average
one gets a misplaced estimate (the check image, `lung_fields.png` of `explain --lungs --out`,
shows the fields on the mean of the checked films); the fields stop at the heart's and the
diaphragm's outlines as a PA film shows them, so lung behind the heart or below the domes
(the posterior recesses) counts as outside; and it knows nothing of the lesions. SCALES gives
the same shapes shrunk and grown about their own centres, to show how much a figure depends
on where the outline was drawn.
"""

from __future__ import annotations

import functools

import numpy as np

from pacs_ai.model import heatmap

# the film's left is the patient's right (a frontal film as displayed)
RIGHT_LUNG = ((0.37, 0.21), (0.30, 0.24), (0.22, 0.32), (0.16, 0.44), (0.13, 0.58), (0.12, 0.72),
              (0.15, 0.77), (0.26, 0.74), (0.36, 0.70), (0.41, 0.66), (0.42, 0.45), (0.41, 0.28))
LEFT_LUNG = ((0.62, 0.22), (0.70, 0.25), (0.78, 0.33), (0.84, 0.45), (0.87, 0.60), (0.88, 0.74),
             (0.85, 0.79), (0.76, 0.78), (0.66, 0.72), (0.60, 0.62), (0.58, 0.45), (0.59, 0.30))
LUNG_FIELDS = (RIGHT_LUNG, LEFT_LUNG)
SCALES = (0.85, 1.0, 1.15)  # the fields as drawn, and shrunk / grown by 15 % about their centres


def lung_field_polygons(rows: int, columns: int, scale: float = 1.0) -> list[np.ndarray]:
    """The two lung fields as closed polygons [K, 2] of (x, y) film pixel coordinates (DICOM's
    convention, as pacs_ai.model.heatmap's regions), `scale` times their size about their centres."""
    polygons = []
    for field in LUNG_FIELDS:
        points = np.array(field, dtype=np.float64)
        centre = polygon_centroid(np.vstack([points, points[:1]]))
        points = centre + (points - centre) * scale
        points = np.vstack([points, points[:1]]) * np.array([columns, rows])
        polygons.append(points)
    return polygons


def lung_field_mask(rows: int, columns: int, scale: float = 1.0) -> np.ndarray:
    """Boolean [rows, columns]: the pixels whose centres lie in either lung field."""
    mask = np.zeros((rows, columns), dtype=bool)
    for polygon in lung_field_polygons(rows, columns, scale):
        mask |= heatmap.region_mask(polygon, rows, columns)
    return mask


def polygon_centroid(polygon: np.ndarray) -> np.ndarray:
    """(x, y) of a closed polygon's area centroid (its first point repeated last); the mean of
    its points when it has no area."""
    x, y = polygon[:, 0], polygon[:, 1]
    cross = x[:-1] * y[1:] - x[1:] * y[:-1]
    area = cross.sum() / 2
    if abs(area) < 1e-12:
        return polygon[:-1].mean(axis=0)
    return np.array([((x[:-1] + x[1:]) * cross).sum(), ((y[:-1] + y[1:]) * cross).sum()]) / (
        6 * area)


def region_in_lungs(region: np.ndarray, lungs: np.ndarray) -> dict[str, float | bool]:
    """For a film-coordinate region polygon and a lung mask of the film's size: whether the
    region's centre (its area centroid) lies in the lungs, and the share of its pixels that do."""
    rows, columns = lungs.shape
    x, y = polygon_centroid(region)
    column, row = int(np.floor(x)), int(np.floor(y))
    centre_inside = bool(0 <= row < rows and 0 <= column < columns and lungs[row, column])
    inside = heatmap.region_mask(region, rows, columns)
    pixels = int(inside.sum())
    share = float((inside & lungs).sum() / pixels) if pixels else float(centre_inside)
    return {"centre_inside": centre_inside, "area_inside": share,
            "centre": [round(float(x) / columns, 4), round(float(y) / rows, 4)]}


def centre_elsewhere(centre: list[float]) -> str:
    """Where a centre outside the fields lies, (x, y) in fractions of the frame: "below" their
    lowest point (diaphragm, upper abdomen), "between" them on its row (spine, mediastinum,
    heart), or "beside" them (chest wall, shoulders, neck, outside the body)."""
    x, y = centre
    if y > max(point[1] for field in LUNG_FIELDS for point in field):
        return "below"
    right, left = _field_masks()
    size = right.shape[0]
    row = min(size - 1, max(0, int(y * size)))
    right, left = np.nonzero(right[row])[0], np.nonzero(left[row])[0]
    if right.size and left.size and right.max() < x * size < left.min():
        return "between"
    return "beside"


@functools.lru_cache(maxsize=1)
def _field_masks(size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The right and the left field, each as a mask of a size x size frame (1000: fine enough
    for centres given to three decimals)."""
    right, left = (heatmap.region_mask(polygon, size, size)
                   for polygon in lung_field_polygons(size, size))
    return right, left


class LungCheck:
    """The lung figures of `explain --lungs`, film by film: the reported region's and the
    random region's centre and area against the fields at each of SCALES, and the mean model
    input of the films seen (for the check image)."""

    def __init__(self) -> None:
        self._masks: dict[tuple[int, int, float], np.ndarray] = {}
        self._input_sum: np.ndarray | None = None
        self._inputs = 0

    def add_inputs(self, inputs: np.ndarray) -> None:
        """Model inputs [N, 1, S, S] of films checked (their mean is drawn under the fields)."""
        total = np.asarray(inputs, dtype=np.float64).sum(axis=(0, 1))
        self._input_sum = total if self._input_sum is None else self._input_sum + total
        self._inputs += len(inputs)

    def film(self, region: np.ndarray, elsewhere: np.ndarray, rows: int,
             columns: int) -> dict[str, object]:
        """Per-film figures for a region and its random placement (film coordinates)."""
        return {"region": {str(scale): region_in_lungs(region, self._mask(rows, columns, scale))
                           for scale in SCALES},
                "random": region_in_lungs(elsewhere, self._mask(rows, columns, 1.0))}

    def _mask(self, rows: int, columns: int, scale: float) -> np.ndarray:
        key = (rows, columns, scale)
        if key not in self._masks:
            self._masks[key] = lung_field_mask(rows, columns, scale)
        return self._masks[key]

    def check_picture(self):
        """The mean model input of the films seen with the fields drawn on it (green: as
        drawn; dark green: the SCALES' smallest and largest), 4 times its size; None when no
        film was seen."""
        from PIL import Image, ImageDraw

        if self._input_sum is None:
            return None
        mean = self._input_sum / self._inputs
        size = 4 * mean.shape[0]
        picture = Image.fromarray(np.clip(mean * 255, 0, 255).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BILINEAR).convert("RGB")
        draw = ImageDraw.Draw(picture)
        for scale in SCALES:
            colour = (0, 255, 0) if scale == 1.0 else (0, 120, 0)
            for polygon in lung_field_polygons(size, size, scale):
                draw.line([tuple(point) for point in polygon.tolist()], fill=colour, width=2)
        return picture


def field_shares(size: int = 200) -> dict[str, float]:
    """The share of the frame the fields cover, per scale: where a point placed at random
    would land in them (computed on a size x size frame; the fractions hold on any film)."""
    return {f"fields x{scale}": round(float(lung_field_mask(size, size, scale).mean()), 4)
            for scale in SCALES}


def lung_figures(films: list[dict[str, object]]) -> dict[str, object]:
    """Over films with `lungs` figures (LungCheck.film): per scale, the share of films whose
    region's centre lies in the lung fields and the mean share of region area inside them; the
    same two for the random regions (as drawn), what chance alone gives; and where the other
    centres lie (centre_elsewhere), as shares of all the films."""
    if not films:
        return {"count": 0}
    figures: dict[str, object] = {"count": len(films)}
    for scale in SCALES:
        values = [film["lungs"]["region"][str(scale)] for film in films]
        figures[f"fields x{scale}"] = _shares(values)
    figures["random region, fields x1.0"] = _shares([film["lungs"]["random"] for film in films])
    elsewhere = [centre_elsewhere(film["lungs"]["region"]["1.0"]["centre"]) for film in films
                 if not film["lungs"]["region"]["1.0"]["centre_inside"]]
    figures["centres not in the fields x1.0"] = {
        place: round(elsewhere.count(place) / len(films), 4)
        for place in ("between", "below", "beside")}
    return figures


def _shares(values: list[dict[str, float | bool]]) -> dict[str, float]:
    return {"share_centre_in_lungs": round(float(np.mean([v["centre_inside"] for v in values])), 4),
            "mean_area_in_lungs": round(float(np.mean([v["area_inside"] for v in values])), 4)}
