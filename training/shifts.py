"""Acquisition shifts that real sites produce, applied to a film's grey levels before the
service's preprocessing: the stress test's conditions (training.stress).

Each shift maps a 2-D float32 picture (grey levels 0-255, bright = dense, any size) and a seeded
numpy generator to a new picture, which then goes through pacs_ai.model.preprocessing.to_model_input exactly
as a DICOM film's pixels would. The rank equalisation in that function makes any monotonic grey
change (gamma, window, contrast) a no-op, so these shifts are mostly about geometry and texture:
field of view, borders, blur and edge enhancement, noise, rotation, burned-in markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

Picture = np.ndarray
Shift = Callable[[Picture, np.random.Generator], Picture]


@dataclass(frozen=True)
class StressCondition:
    name: str
    group: str  # field-of-view, processing, geometry, markers, resolution, none
    description: str
    apply: Shift


def _pil(picture: Picture) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(picture, dtype=np.float32), mode="F")


def _array(image: Image.Image) -> Picture:
    return np.asarray(image, dtype=np.float32)


def crop(fraction_top: float, fraction_bottom: float, fraction_left: float,
         fraction_right: float) -> Shift:
    """Keep the inner part: a tighter collimation, or a film positioned off centre."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        rows, columns = picture.shape
        top, bottom = round(rows * fraction_top), rows - round(rows * fraction_bottom)
        left, right = round(columns * fraction_left), columns - round(columns * fraction_right)
        return picture[top:bottom, left:right]
    return apply


def border(fraction: float, value: float | None, mode: str = "constant") -> Shift:
    """A frame around the film: black or white (shutters, scanner bed), or the film's own edge
    continued ('reflect': a wider field of view with more body above and below)."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        rows, columns = picture.shape
        pad = ((round(rows * fraction),) * 2, (round(columns * fraction),) * 2)
        if mode == "reflect":
            return np.pad(picture, (pad[0], (0, 0)), mode="reflect")
        return np.pad(picture, pad, mode="constant", constant_values=value)
    return apply


def gamma(power: float) -> Shift:
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        return 255.0 * np.power(np.clip(picture, 0, 255) / 255.0, power)
    return apply


def contrast(factor: float) -> Shift:
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        return np.clip((picture - 128.0) * factor + 128.0, 0, 255)
    return apply


def gaussian_blur(picture: Picture, sigma: float) -> Picture:
    """Separable Gaussian blur in float (Pillow's filter takes no float pictures), edges
    continued."""
    radius = max(1, int(round(3 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(picture.astype(np.float64), radius, mode="edge")
    rows = sum(w * padded[:, radius + o:padded.shape[1] - radius + o]
               for w, o in zip(kernel, offsets.astype(int)))
    both = sum(w * rows[radius + o:rows.shape[0] - radius + o, :]
               for w, o in zip(kernel, offsets.astype(int)))
    return both.astype(np.float32)


def blur(sigma_at_224: float) -> Shift:
    """Gaussian blur, sigma in pixels of a 224-px-wide film (scaled to the film's width)."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        return gaussian_blur(picture, sigma_at_224 * picture.shape[1] / 224)
    return apply


def unsharp(sigma_at_224: float, amount: float) -> Shift:
    """Edge enhancement as vendors' processing does it: picture + amount * (picture - blurred)."""
    def apply(picture: Picture, rng: np.random.Generator) -> Picture:
        blurred = blur(sigma_at_224)(picture, rng)
        return np.clip(picture + amount * (picture - blurred), 0, 255)
    return apply


def noise(sigma: float) -> Shift:
    """Additive Gaussian noise (quantum mottle of a low-dose film), sigma in grey levels."""
    def apply(picture: Picture, rng: np.random.Generator) -> Picture:
        return np.clip(picture + rng.normal(0, sigma, picture.shape), 0, 255).astype(np.float32)
    return apply


def rotate(degrees: float) -> Shift:
    """Rotation about the centre, corners filled black as a rotated cassette leaves them."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        return _array(_pil(picture).rotate(degrees, resample=Image.Resampling.BILINEAR,
                                           fillcolor=0.0))
    return apply


def markers(count: int = 3) -> Shift:
    """Burned-in white side markers and text labels near the corners ('L', 'PORTABLE', ...)."""
    words = ("L", "R", "PORTABLE", "AP SUPINE", "ERECT")

    def apply(picture: Picture, rng: np.random.Generator) -> Picture:
        image = _pil(picture)
        draw = ImageDraw.Draw(image)
        rows, columns = picture.shape
        for _ in range(count):
            word = words[int(rng.integers(len(words)))]
            height = rows * rng.uniform(0.04, 0.08)
            width = min(columns * 0.45, height * 0.7 * len(word))
            corner_x = rng.choice([rng.uniform(0.02, 0.1), rng.uniform(0.55, 0.9)]) * columns
            corner_y = rng.choice([rng.uniform(0.02, 0.1), rng.uniform(0.8, 0.9)]) * rows
            box = [corner_x, corner_y, min(corner_x + width, columns - 1),
                   min(corner_y + height, rows - 1)]
            draw.rectangle(box, fill=255.0)  # the marker's plate
            inset = height * 0.2
            draw.rectangle([box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset],
                           fill=40.0)  # the letters' dark strokes, as a block
        return _array(image)
    return apply


def resample(size: tuple[int, int]) -> Shift:
    """Another resolution or aspect ratio: the film as a site's detector would sample it."""
    def apply(picture: Picture, _rng: np.random.Generator) -> Picture:
        return _array(_pil(picture).resize(size, Image.Resampling.BILINEAR))
    return apply


def identity(picture: Picture, _rng: np.random.Generator) -> Picture:
    return picture


CONDITIONS: tuple[StressCondition, ...] = (
    StressCondition("none", "none", "the validation split as it is", identity),
    StressCondition("crop-tight-12", "field-of-view", "12 % cut on every side (tight collimation)",
                    crop(0.12, 0.12, 0.12, 0.12)),
    StressCondition("crop-tight-20", "field-of-view", "20 % cut on every side",
                    crop(0.20, 0.20, 0.20, 0.20)),
    StressCondition("crop-sides-12", "field-of-view", "12 % cut left and right only (portrait "
                    "aspect)", crop(0.0, 0.0, 0.12, 0.12)),
    StressCondition("off-centre", "field-of-view", "15 % cut at top and left (film off centre)",
                    crop(0.15, 0.0, 0.15, 0.0)),
    StressCondition("border-black-12", "field-of-view", "12 % black frame on every side",
                    border(0.12, 0.0)),
    StressCondition("border-white-12", "field-of-view", "12 % white frame on every side",
                    border(0.12, 255.0)),
    StressCondition("wide-reflect-15", "field-of-view", "15 % more above and below (film edge "
                    "mirrored: a wider field with neck and abdomen)", border(0.15, None, "reflect")),
    StressCondition("gamma-0.6", "processing", "gamma 0.6", gamma(0.6)),
    StressCondition("gamma-1.6", "processing", "gamma 1.6", gamma(1.6)),
    StressCondition("contrast-0.5", "processing", "contrast halved about mid-grey", contrast(0.5)),
    StressCondition("blur-1.5", "processing", "Gaussian blur, sigma 1.5 px at 224 px", blur(1.5)),
    StressCondition("unsharp-2x1.5", "processing", "unsharp mask, sigma 2 px, amount 1.5",
                    unsharp(2.0, 1.5)),
    StressCondition("noise-8", "processing", "Gaussian noise, sigma 8 grey levels", noise(8.0)),
    StressCondition("rotate+8", "geometry", "rotated 8 degrees, black corners", rotate(8.0)),
    StressCondition("rotate-8", "geometry", "rotated -8 degrees, black corners", rotate(-8.0)),
    StressCondition("markers", "markers", "three burned-in white markers/labels near the corners",
                    markers(3)),
    StressCondition("low-res-64", "resolution", "sampled at 64 x 64", resample((64, 64))),
    StressCondition("high-res-1024", "resolution", "sampled at 1024 x 1024 (a full-size detector)",
                    resample((1024, 1024))),
    StressCondition("crop-ends-12", "field-of-view", "12 % cut at top and bottom only (landscape "
                    "aspect: the chest looks taller after the squash to 200 x 200)",
                    crop(0.12, 0.12, 0.0, 0.0)),
)

CONDITIONS_BY_NAME = {condition.name: condition for condition in CONDITIONS}
