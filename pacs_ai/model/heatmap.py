"""The saliency map of one film, and the region it outlines: shared by the service (SR region,
heat-map image) and `python -m training explain` (the deletion check), so what is checked is
what is reported.

A map is a small grid (the model's `saliency` output, 12 x 12 for the shipped ensemble) over the
200 x 200 model input. The model input is the whole film squashed (pacs_ai.model.preprocessing:
corners to corners, no crop), so grid cell (i, j) covers exactly rows [i * R / G, (i + 1) * R / G)
and columns [j * C / G, (j + 1) * C / G) of a film of R rows and C columns. DICOM spatial
coordinates (PS3.3 C.10.5.1.2) put (0, 0) at the top left corner of the top left pixel and
(C, R) at the bottom right corner of the last one, so a point (x, y) of the grid is
(x * C / G, y * R / G) on the film, with no half-pixel shift.

The region: the map is upsampled (bilinear, REGION_UPSAMPLE times) to smooth the cell edges, the
cells at or above REGION_FRACTION of the map's maximum are kept, their largest 8-connected
component is taken, and the region is the convex hull of its cells' corners. A fixed rule,
chosen before any figure was measured; the deletion check measures how well it does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

REGION_FRACTION = 0.5  # of the map's maximum
REGION_UPSAMPLE = 4
MAP_DTYPE = np.float16  # what travels from the model to the report: a few hundred bytes


def normalised(saliency: np.ndarray) -> np.ndarray | None:
    """The map scaled to [0, 1] (float16), or None when it is flat or not finite (nothing
    to outline: no region, no heat map)."""
    values = np.asarray(saliency, dtype=np.float32)
    if values.ndim != 2 or not np.isfinite(values).all():
        return None
    values = np.maximum(values, 0.0)
    peak = float(values.max())
    if peak <= 0.0:
        return None
    return (values / peak).astype(MAP_DTYPE)


def upsampled(grid: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The grid resized to rows x columns (bilinear, float32), corners to corners."""
    picture = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32), mode="F")
    return np.asarray(picture.resize((columns, rows), Image.Resampling.BILINEAR),
                      dtype=np.float32)


def region_polygon(grid: np.ndarray) -> np.ndarray | None:
    """The region's outline as a closed polygon [K, 2] of (x, y) in grid units (0..G on
    each axis), first point repeated last; None when the map has no region."""
    rows, columns = grid.shape
    fine = upsampled(grid, rows * REGION_UPSAMPLE, columns * REGION_UPSAMPLE)
    peak = float(fine.max())
    if not np.isfinite(peak) or peak <= 0:
        return None
    component = _largest_component(fine >= REGION_FRACTION * peak)
    if component is None:
        return None
    ys, xs = np.nonzero(component)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1)
                              for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    hull = _convex_hull(corners) / REGION_UPSAMPLE
    return np.vstack([hull, hull[:1]])


def to_film(polygon: np.ndarray, grid_shape: tuple[int, int], rows: int,
            columns: int) -> np.ndarray:
    """Grid-unit (x, y) points as film pixel coordinates (DICOM column, row; float)."""
    grid_rows, grid_columns = grid_shape
    scale = np.array([columns / grid_columns, rows / grid_rows])
    return polygon * scale


def region_mask(polygon: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Boolean [rows, columns]: the pixels whose centres lie inside a film-coordinate polygon."""
    mask = Image.new("1", (columns, rows), 0)
    # ImageDraw fills pixel (i, j) by its index; its centre is at (i + 0.5, j + 0.5)
    ImageDraw.Draw(mask).polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in polygon],
                                 fill=1)
    return np.asarray(mask, dtype=bool)


def polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2)


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected component of a boolean mask (ties: the first found)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    rows, columns = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < rows and 0 <= nx < columns and mask[ny, nx] \
                            and not labels[ny, nx]:
                        labels[ny, nx] = label
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else None


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull (Andrew's monotone chain) of [N, 2] points, without repeats."""
    unique = sorted({(float(x), float(y)) for x, y in points})
    if len(unique) < 3:
        return np.array(unique)

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for point in unique:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], point) <= 0:
            lower.pop()
        lower.append(point)
    upper: list[tuple[float, float]] = []
    for point in reversed(unique):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], point) <= 0:
            upper.pop()
        upper.append(point)
    return np.array(lower[:-1] + upper[:-1])
