"""The heat-map image sent with a report: a Secondary Capture for eyes, in the source's study.

An RGB picture: the film (display grey levels, reduced so its longest side is at most
MAX_SIDE pixels) with the saliency map blended in colour where it is at least SHOWN_FROM of its
maximum, the reported region outlined, a colour bar in a strip beside the film, and the words
"AI heat map - not for diagnosis" burned in (Burned In Annotation YES). Same patient and study as
the source, a series of its own (one per study and model version) and deterministic UIDs
(pacs_ai.uids.heatmap_uid), so a re-sent film gives the same instance, never a second one.

The map reaches this module as a small grid (pacs_ai.heatmap); the film is decoded for it no
larger than the picture needs (pacs_ai.pixels.display_picture), and only the reduced picture is
held in colour, never a full-resolution float copy of the film or the map.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import pacs_ai
from pacs_ai import heatmap
from pacs_ai.model import ModelInfo
from pacs_ai.report import instance_number, patient_and_study, site_settings_part
from pacs_ai.uids import heatmap_series_uid, heatmap_uid

MAX_SIDE = 1024  # longest side of the picture's film part, in pixels
SHOWN_FROM = 0.2  # of the map's maximum: weaker saliency leaves the film grey
OPACITY = 0.5  # of the colour at the map's maximum
WARNING_TEXT = "AI heat map - not for diagnosis"
SERIES_DESCRIPTION = "pacs-ai heat map (AI, not for diagnosis)"
DEFAULT_SERIES_NUMBER = 9902  # after the reports' 9901
OUTLINE_COLOUR = (255, 255, 255)


def colour_scale(values: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] for values in [0, 1]: blue, cyan, green, yellow, red (a jet-like
    scale, kept here so no plotting library is needed)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


_LEVELS = 256
# per grey level of the map (0..255): its colour, as a palette, and its opacity (0 below
# SHOWN_FROM), as a Pillow point table, so that the blending runs in Pillow's C loops
_PALETTE = colour_scale(np.arange(_LEVELS, dtype=np.float32) / (_LEVELS - 1)).ravel().tolist()
_OPACITY_TABLE = [0 if level / (_LEVELS - 1) < SHOWN_FROM
                  else round(255 * OPACITY * level / (_LEVELS - 1)) for level in range(_LEVELS)]


def picture_size(rows: int, columns: int) -> tuple[int, int]:
    """(rows, columns) of the picture's film part: the film reduced by the smallest whole
    factor that brings its longest side to MAX_SIDE or less."""
    factor = max(1, math.ceil(max(rows, columns) / MAX_SIDE))
    return max(1, round(rows / factor)), max(1, round(columns / factor))


def film_grey(display: np.ndarray, box: tuple[float, float, float, float],
              rows: int, columns: int) -> np.ndarray:
    """uint8 grey [rows, columns] of the film region `box` (Pillow's convention) of a display
    array in [0, 1] (pacs_ai.pixels.display_picture: possibly decoded smaller)."""
    picture = Image.fromarray(np.ascontiguousarray(display, dtype=np.float32), mode="F")
    resized = picture.resize((columns, rows), Image.Resampling.BILINEAR, box=box)
    # scaled and rounded to 8 bits in Pillow's C loops (values outside 0..255 are clipped)
    return np.asarray(resized.point(lambda value: value * 255.0 + 0.5).convert("L"))


def render(display: np.ndarray, box: tuple[float, float, float, float], film_rows: int,
           film_columns: int, grid: np.ndarray, region: np.ndarray | None,
           caption: str) -> np.ndarray:
    """RGB uint8 [rows, columns + bar, 3]: the film (its region `box` of `display`) with its
    normalised map grid in colour, the reported region (film coordinates, or None)
    outlined, a colour bar and the caption."""
    rows, columns = picture_size(film_rows, film_columns)
    film = Image.fromarray(film_grey(display, box, rows, columns), mode="L").convert("RGB")
    strength = heatmap.upsampled(grid, rows, columns)  # corners to corners, like the film
    levels = Image.fromarray(
        np.clip(strength * (_LEVELS - 1) + 0.5, 0, _LEVELS - 1).astype(np.uint8), mode="L")
    colours = levels.copy()
    colours.putpalette(_PALETTE)
    film.paste(colours.convert("RGB"), (0, 0), levels.point(_OPACITY_TABLE))
    bar_width = max(24, columns // 16)
    picture = Image.new("RGB", (columns + bar_width, rows))
    picture.paste(film, (0, 0))
    draw = ImageDraw.Draw(picture)
    if region is not None:
        scale = np.array([columns / film_columns, rows / film_rows])
        draw.line([tuple(point) for point in (np.asarray(region) * scale).tolist()],
                  fill=OUTLINE_COLOUR, width=max(1, rows // 400))
    _colour_bar(draw, picture, columns, bar_width, rows)
    _caption(draw, [WARNING_TEXT, caption], rows)
    return np.asarray(picture)


def _colour_bar(draw: ImageDraw.ImageDraw, picture: Image.Image, left: int, width: int,
                rows: int) -> None:
    """A vertical scale from the map's maximum (top) to SHOWN_FROM (bottom), in the strip
    beside the film."""
    margin = max(4, rows // 20)
    height = rows - 2 * margin
    if height < 8:
        return
    levels = np.linspace(1.0, SHOWN_FROM, height)
    bar = np.repeat(colour_scale(levels)[:, None, :], width // 2, axis=1)
    picture.paste(Image.fromarray(bar, mode="RGB"), (left + width // 4, margin))
    font = _font(max(8, width // 3))
    draw.text((left + 2, 1), "high", fill=(255, 255, 255), font=font)
    draw.text((left + 2, rows - margin + 1), "low", fill=(255, 255, 255), font=font)


def _caption(draw: ImageDraw.ImageDraw, lines: list[str], rows: int) -> None:
    size = max(10, rows // 40)
    font = _font(size)
    for index, line in enumerate(lines):
        position = (size // 2, size // 2 + index * (size + size // 3))
        # on a black box: readable on any film, cheaper than an outlined font
        draw.rectangle(draw.textbbox(position, line, font=font), fill=(0, 0, 0))
        draw.text(position, line, fill=(255, 255, 0), font=font)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def build_heatmap_image(header: Dataset, display: np.ndarray, grid: np.ndarray,
                        region: np.ndarray | None, probability: float, model: ModelInfo, *,
                        box: tuple[float, float, float, float] | None = None,
                        manufacturer: str = "pacs-ai",
                        series_number: int = DEFAULT_SERIES_NUMBER) -> Dataset:
    """The Secondary Capture for one source film. `header`: the checked source header
    (pacs_ai.report.source_header); `display`: its display array (pacs_ai.pixels, [0, 1]),
    `box` the film's region in it when it was decoded smaller (display_picture); `grid`: its
    normalised map; `region`: the reported region in film coordinates or None."""
    caption = f"{model.name} {model.version}: pneumonia probability {probability:.3f}"
    rows, columns = int(header.Rows), int(header.Columns)
    if box is None:
        box = (0, 0, display.shape[1], display.shape[0])
    pixels = render(display, box, rows, columns, grid, region, caption)
    source_uid = str(header.SOPInstanceUID)
    image = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=heatmap_series_uid(header.StudyInstanceUID, model.name,
                                               model.version),
        series_number=series_number,
        sop_instance_uid=heatmap_uid(source_uid, model.name, model.version,
                                     site_settings_part(model)),
        instance_number=instance_number(header),
        manufacturer=manufacturer,
        **patient_and_study(header),
        # highdicom wants two values; emptied below when the source states none
        patient_orientation=_orientation(header) or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if _orientation(header) is None:
        image.PatientOrientation = ""  # Type 2: unknown, as on the source
    image.copy_patient_and_study_information(header)
    if "SpecificCharacterSet" in header:
        image.SpecificCharacterSet = header.SpecificCharacterSet
    # a chest is not a paired body part, so General Series needs no Laterality (Type 2C)
    image.BodyPartExamined = "CHEST"
    image.BurnedInAnnotation = "YES"
    image.SeriesDescription = SERIES_DESCRIPTION
    image.ManufacturerModelName = model.name
    image.SoftwareVersions = [f"pacs-ai {pacs_ai.__version__}", f"model {model.version}"]
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = (f"saliency map of {model.name} {model.version} blended in "
                                   "colour over the source film")
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    image.SourceImageSequence = [source]
    return image


def _orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it has two values (the picture is the film as
    displayed, so it has the same); else None."""
    orientation = header.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2 \
            and all(orientation):
        return str(orientation[0]), str(orientation[1])
    return None
