"""Processing other hospitals apply that neither the classifier's nor the gate's training saw,
and that no threshold was set on: for the gate check only (training.gate_check), as a stand-in
for adult films from hospitals the project has no films of. A gate that keys on the adult
hospital's look rather than on anatomy lets adults processed these ways through; one that keys
on anatomy still stops them, and still passes children's films processed the same ways.

Each is a training.shifts.StressCondition (a picture in grey levels 0-255, any size, in; the
processed picture out), so the gate check reads them as it reads the stress conditions.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from training.shifts import Picture, Shift, StressCondition, blur, gaussian_blur


def equalized(picture: Picture, _rng: np.random.Generator) -> Picture:
    """Global histogram equalisation: the flat, high-contrast look of many CR readers."""
    grey = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
    return np.asarray(ImageOps.equalize(grey), dtype=np.float32)


def local_contrast(tiles: int = 8, strength: float = 0.7) -> Shift:
    """Contrast evened out region by region (in the spirit of CLAHE and of vendors'
    'dynamic range' processing): each pixel moved towards the grey levels of a picture whose
    local mean and spread are the same everywhere; `strength` 1 is the full move."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        sigma = picture.shape[1] / tiles
        mean = gaussian_blur(picture, sigma)
        spread = np.sqrt(np.maximum(gaussian_blur((picture - mean) ** 2, sigma), 1.0))
        flattened = 128.0 + 48.0 * (picture - mean) / spread
        return np.clip((1 - strength) * picture + strength * flattened, 0, 255).astype(np.float32)
    return apply


def large_kernel_enhancement(sigma_at_224: float = 12.0, amount: float = 1.5) -> Shift:
    """Unsharp masking with a large kernel (multi-frequency processing's low band): the
    mediastinum and lung fields pulled together, edges of the ribs raised."""
    def apply(picture: Picture, rng: np.random.Generator) -> Picture:
        return np.clip(picture + amount * (picture - blur(sigma_at_224)(picture, rng)),
                       0, 255).astype(np.float32)
    return apply


def sigmoid_window(slope: float = 8.0) -> Shift:
    """A steep S-shaped look-up table (a narrow window): dark lungs, bright bones."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        values = np.clip(picture, 0, 255) / 255.0
        curve = 1 / (1 + np.exp(-slope * (values - 0.5)))
        low, high = 1 / (1 + np.exp(slope * 0.5)), 1 / (1 + np.exp(-slope * 0.5))
        return (255.0 * (curve - low) / (high - low)).astype(np.float32)
    return apply


def jpeg(quality: int) -> Shift:
    """Lossy JPEG at `quality`, as films exported from a viewer or sent as secondary captures."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        buffer = io.BytesIO()
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                         quality=quality)
        return np.asarray(Image.open(buffer), dtype=np.float32)
    return apply


UNSEEN_PROCESSING: tuple[StressCondition, ...] = (
    StressCondition("equalized", "unseen-processing", "global histogram equalisation", equalized),
    StressCondition("local-contrast", "unseen-processing",
                    "contrast evened out region by region (CLAHE-like), 8 regions across",
                    local_contrast()),
    StressCondition("large-kernel-1.5", "unseen-processing",
                    "unsharp mask with a large kernel: sigma 12 px at 224 px, amount 1.5",
                    large_kernel_enhancement()),
    StressCondition("sigmoid-window", "unseen-processing",
                    "steep S-shaped look-up table (narrow window)", sigmoid_window()),
    StressCondition("jpeg-20", "unseen-processing", "lossy JPEG, quality 20", jpeg(20)),
)
