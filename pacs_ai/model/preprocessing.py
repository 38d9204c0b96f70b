"""The one preprocessing function shared by training and the service.

Training calls it on JPEG pixels, the service on decoded DICOM pixels, so the two cannot
drift apart. Input is a 2-D grayscale array that is already display oriented (bright = dense,
i.e. MONOCHROME2 after any LUTs); output is the model input, float32 of shape [1, 200, 200].

Steps, and why:
1. Resize to 200 x 200 without keeping the aspect ratio (the training images were squashed
   the same way), with Pillow's antialiased bilinear filter in float, so a 12/16-bit film and an
   8-bit JPEG of the same picture end up alike.
2. Rank-based histogram equalisation to [0, 1]. It is invariant to any monotonic change of grey
   levels (window, gamma, bit depth, vendor processing), which makes the model see the same
   picture however a site exposes and processes its films.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MODEL_INPUT_SIZE = 200
# A film may be decoded smaller for the model (pacs_ai.film.pixels_reduced), but never below twice
# the input per side, so the antialiased resize still averages at least 2 x 2 pixels into each.
DECODE_MIN_SIZE = 2 * MODEL_INPUT_SIZE
# An identifier, not an import path: every model file carries it (the service refuses another),
# so it keeps the name this module had when v1 was defined (pacs_ai/imaging.py).
PREPROCESSING_ID = "pacs_ai.imaging.to_model_input/v1"


def to_model_input(image: np.ndarray,
                   box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Map a 2-D grayscale array (any size, any real dtype) to float32 [1, 200, 200] in [0, 1].

    `box`: the picture's region in the array, (left, top, right, bottom) in pixels, for a film
    decoded smaller than it is (`pacs_ai.film.pixels.DisplayPicture`); None: the whole array, as in
    training."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {array.shape}")
    if array.shape[0] < 2 or array.shape[1] < 2:
        raise ValueError(f"image too small: {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == bool):
        raise ValueError(f"unsupported pixel dtype {array.dtype}")
    values = array.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ValueError("image contains NaN or infinite values")
    resized = resize_to_model_size(values, box)
    return equalize_histogram(resized)[np.newaxis, :, :]


def resize_to_model_size(values: np.ndarray,
                         box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Antialiased bilinear resize of a float32 2-D array (or of its region `box`) to
    MODEL_INPUT_SIZE squared."""
    picture = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    size = (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
    if box is not None and tuple(box) == (0, 0, values.shape[1], values.shape[0]):
        box = None  # the whole array: exactly the resize training used
    return np.asarray(picture.resize(size, Image.Resampling.BILINEAR, box=box), dtype=np.float32)


def equalize_histogram(values: np.ndarray) -> np.ndarray:
    """Replace each value by its mid-rank in (0, 1); equal values get equal output."""
    unique, inverse, counts = np.unique(values.ravel(), return_inverse=True, return_counts=True)
    mid_rank = (np.cumsum(counts) - counts / 2.0) / values.size
    return mid_rank[inverse].reshape(values.shape).astype(np.float32)
