"""DICOM pixels -> display-oriented 2-D array (placeholder; the pixel issue completes it)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DEFAULT_MAX_PIXELS = 50_000_000


class PixelDataError(ValueError):
    """The pixel data cannot be turned into a picture; str(error) is the recorded reason."""


def display_array(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decoded, modality- and VOI-LUT-applied pixels, MONOCHROME1 inverted; float32 2-D."""
    if "PixelData" not in ds:
        raise PixelDataError("no-pixel-data: the dataset has no Pixel Data")
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows * columns > max_pixels:
        raise PixelDataError(f"too-large: {rows} x {columns} pixels exceeds {max_pixels}")
    pixels = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels
