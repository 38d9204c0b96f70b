"""The service's per-film step: a received file -> the model input, or the reason it has none.

read -> filter (`pacs_ai.film.filters`) -> pixels (`pacs_ai.film.pixels`, DICOM to a display picture)
-> preprocessing (`pacs_ai.model.preprocessing.to_model_input`). A worker runs `prepare` in a helper
process (`pacs_ai.classify.helper_processes`) on each film it claims; offline classification
(`pacs_ai.evaluate.offline_classification`: `pacs-ai classify`, `pacs-ai evaluate`) runs the same
function on files, so the two cannot differ. PNG and JPEG files are read too, for the offline
commands; the listener only ever stores DICOM. Each prepared file says whether its header gave
a usable patient age (`Prepared.age_known`; a PNG or JPEG has none), so films classified
without one can be counted, and what that age is (`Prepared.age`), for a [shadow] model's own
age range (`pacs_ai.classify.shadow`).

A DICOM film is read and decoded here once. What later steps need of it (the report's header,
the film at the heat-map image's size) is taken from that read and decode by the caller's `keep`
function and travels with the result (`Prepared.kept`), so the report step need not read the
file again (`pacs_ai.classify.helper_processes`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydicom.dataset import Dataset

from pacs_ai.config import DEFAULT_MAX_PIXELS, FilterPolicy
from pacs_ai.film.filters import screen, screen_without_age
from pacs_ai.film.pixels import (DisplayPicture, PixelDataError, decode_for_display,
                                 display_from_decoded)
from pacs_ai.film.pixels_reduced import SmallDecode
from pacs_ai.model.intended_use import PatientAge
from pacs_ai.model.preprocessing import DECODE_MIN_SIZE, to_model_input

REASON_PATTERN = re.compile(r"^[a-z]+(-[a-z]+)*: ")
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class SkipImage(Exception):
    """The file is a valid image the model was not made for; str(error) is the reason."""


class PrepareStatus(StrEnum):
    """What preparing a film came to (a StrEnum: `pacs-ai classify` prints the string)."""
    OK = "ok"  # model_input is set
    SKIPPED = "skipped"  # a valid image the model was not made for; the reason says why
    ERROR = "error"  # unreadable or broken; the reason says "<code>: <detail>"


@dataclass
class Prepared:
    path: Path
    model_input: np.ndarray | None = None
    status: PrepareStatus = PrepareStatus.OK
    reason: str | None = None
    seconds: float = 0.0  # reading, decoding and preprocessing this file took
    # The header gave a usable patient age (False for a PNG/JPEG; None: not looked at, the
    # file was skipped by an earlier filter or could not be read).
    age_known: bool | None = None
    age: PatientAge | None = None  # that age, when the header gave one
    kept: Any = None  # what prepare's `keep` made of the DICOM film's read and decode


# What a caller keeps of a DICOM film it prepares, made from the dataset as read and its
# decoded stored values (pacs_ai.film.pixels.decode_for_display), while both are in hand.
Keep = Callable[[Dataset, SmallDecode], Any]


class FilmPicture(NamedTuple):
    picture: DisplayPicture
    age_known: bool  # the header gave a usable patient age
    dataset: Dataset | None = None  # a DICOM film as read
    decoded: SmallDecode | None = None  # its stored values, decoded for the picture
    age: PatientAge | None = None  # the patient's age, when the header gave a usable one


def read_display_image(path: Path, policy: FilterPolicy, max_pixels: int) -> FilmPicture:
    """A display-oriented 2-D array from a DICOM, PNG or JPEG file (a DICOM film possibly
    decoded smaller, down to what the model input needs), and whether it has a patient age.

    Raises SkipImage for images outside the model's scope, ValueError ("<code>: <detail>")
    for unreadable ones.
    """
    if path.exists() and not path.is_file():  # a pipe would block the read below for good
        raise ValueError("unreadable: not a regular file (a folder, a pipe or a device)")
    with path.open("rb") as handle:
        head = handle.read(132)
    if head[128:132] == b"DICM":
        return read_dicom_image(path, policy, max_pixels)
    if path.suffix.lower() in PICTURE_SUFFIXES or head.startswith((b"\x89PNG", b"\xff\xd8")):
        screening = screen_without_age(policy)  # no header, so no age
        if screening.reason is not None:
            raise SkipImage(screening.reason)
        picture = read_picture(path, max_pixels)
        return FilmPicture(DisplayPicture(picture, (0, 0, picture.shape[1], picture.shape[0])),
                           age_known=False)
    return read_dicom_image(path, policy, max_pixels)


def read_picture(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:  # reads the header only; pixels once transposed
            if opened.width * opened.height > max_pixels:
                raise PixelDataError(f"too-large: {opened.width} x {opened.height} pixels "
                                     f"exceeds the limit of {max_pixels} pixels")
            # upright as a viewer shows it: an export may store it turned, with EXIF Orientation
            picture = transparent_border_removed(ImageOps.exif_transpose(opened))
            if picture.mode.startswith("I") or picture.mode == "F":
                # 16-bit (and 32-bit) grayscale, as radiographs are often exported: convert("L")
                # would clip every value over 255 to white, so keep the values themselves.
                return np.asarray(picture)
            return np.asarray(picture.convert("L"))
    except Image.DecompressionBombError as error:
        raise PixelDataError(f"too-large: {error}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"unreadable: not a readable PNG/JPEG ({error})") from None


def transparent_border_removed(picture: Any) -> Any:
    """The picture cropped to its opaque part: a film saved on a transparent canvas (a viewer's
    "save image") has a border that is no part of the film, and the grey under it (white from
    some tools) would be read as film. Transparency inside that box is left as it is."""
    opacity = _opacity(picture)
    box = opacity.getbbox() if opacity is not None else None  # the pixels not wholly transparent
    if box is None or box == (0, 0, picture.width, picture.height):
        return picture  # no transparency, wholly transparent (nothing to go by), or no border
    return picture.crop(box)


def _opacity(picture: Any) -> Any:
    """The picture's opacity as an 8-bit image (0: transparent), or None without transparency:
    an alpha channel, or PNG's tRNS key (one grey, colour or palette index is transparent)."""
    from PIL import Image

    if "A" in picture.getbands():
        return picture.getchannel("A")
    key = picture.info.get("transparency")
    if key is None:
        return None
    if picture.mode == "P":
        return picture.convert("RGBA").getchannel("A")
    if picture.mode in ("L", "RGB") or picture.mode.startswith("I;16"):
        values = np.asarray(picture)  # a 16-bit grey's key is 16-bit, so not via convert
        opaque = values != key if values.ndim == 2 else np.any(values != np.asarray(key), axis=-1)
        return Image.fromarray(opaque.astype(np.uint8))
    return None


def read_dicom_image(path: Path, policy: FilterPolicy, max_pixels: int) -> FilmPicture:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError:
        raise ValueError("not-dicom: not a DICOM, PNG or JPEG file") from None
    except Exception as error:  # pydicom raises many kinds on corrupt headers
        raise ValueError(f"unreadable: DICOM header cannot be parsed "
                         f"({type(error).__name__}: {error})") from None
    return dataset_film_picture(dataset, policy, max_pixels)


def dataset_film_picture(dataset: Dataset, policy: FilterPolicy = FilterPolicy(),
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> FilmPicture:
    """Filter, then decode: SkipImage for "not for this model", PixelDataError for broken."""
    try:
        screening = screen(dataset, policy)
    except Exception as error:  # a header so odd that even the filter cannot read it
        raise PixelDataError(f"bad-pixel-header: {type(error).__name__}: {error}") from None
    if screening.reason is not None:
        raise SkipImage(screening.reason)
    # decoded no larger than the model input needs (2 x 200 per side at least): the same
    # model input within the consistency tests' tolerance for a fraction of the CPU (issue 16)
    decoded = decode_for_display(dataset, max_pixels=max_pixels, min_size=DECODE_MIN_SIZE)
    picture = display_from_decoded(dataset, decoded, DECODE_MIN_SIZE)
    return FilmPicture(picture, bool(screening.age_known), dataset, decoded, screening.age)


def dataset_display_image(dataset: Dataset, policy: FilterPolicy = FilterPolicy(),
                          max_pixels: int = DEFAULT_MAX_PIXELS) -> DisplayPicture:
    """The decoded picture of a dataset that passes the filters (dataset_film_picture's)."""
    return dataset_film_picture(dataset, policy, max_pixels).picture


def _model_input(picture: DisplayPicture) -> np.ndarray:
    try:
        return to_model_input(picture.values, picture.box)
    except ValueError as error:
        raise PixelDataError(f"decode-failed: the decoded picture is unusable ({error})") from None


def prepare(path: Path, policy: FilterPolicy, max_pixels: int,
            keep: Keep | None = None) -> Prepared:
    """The film's model input, or why it has none. `keep`: called with a DICOM film's dataset
    and decoded values once its model input is made; what it returns is `Prepared.kept` (it
    must not raise, and must not change what it is given)."""
    started = time.perf_counter()
    prepared = _prepare(path, policy, max_pixels, keep)
    prepared.seconds = time.perf_counter() - started
    return prepared


def _prepare(path: Path, policy: FilterPolicy, max_pixels: int, keep: Keep | None) -> Prepared:
    try:
        image = read_display_image(path, policy, max_pixels)
        prepared = Prepared(path, model_input=_model_input(image.picture),
                            age_known=image.age_known, age=image.age)
        if keep is not None and image.dataset is not None and image.decoded is not None:
            prepared.kept = keep(image.dataset, image.decoded)
        return prepared
    except SkipImage as skip:
        return Prepared(path, status=PrepareStatus.SKIPPED, reason=str(skip))
    except ValueError as error:  # PixelDataError is one; ours all read "<code>: <detail>"
        reason = str(error) if REASON_PATTERN.match(str(error)) else f"decode-failed: {error}"
        return Prepared(path, status=PrepareStatus.ERROR, reason=reason)
    except OSError as error:
        return Prepared(path, status=PrepareStatus.ERROR, reason=f"unreadable: {error}")
    except MemoryError:
        return Prepared(path, status=PrepareStatus.ERROR,
                        reason="too-large: out of memory while reading")
    except Exception as error:  # a decoder bug must not end a run over hundreds of files
        return Prepared(path, status=PrepareStatus.ERROR,
                        reason=f"decode-failed: {type(error).__name__}: {error}")
