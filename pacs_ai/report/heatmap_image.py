"""The heat-map image sent with a report: a Secondary Capture for eyes, in the source's study.

An RGB picture: the film (display grey levels, reduced so its longest side is at most
MAX_SIDE pixels) with the saliency map blended in colour where it is at least SHOWN_FROM of its
maximum and the reported region outlined; beside it a strip with the colour scale (tick labels
for the map's fraction of its maximum, a mark at the outline's level); below both a band with
the words "AI heat map - not for diagnosis", the model and its probability (probability_label)
and what the colours mean (Burned In Annotation YES). Strip and band add area: no word covers
any part of the film, so its own markers (side, projection) stay visible. Same patient and study as
the source, a series of its own (one per study and model version) and deterministic UIDs
(pacs_ai.report.uids.heatmap_uid), so a re-sent film gives the same instance, never a second one.

The map reaches this module as a small grid (pacs_ai.model.heatmap); the film is decoded for it no
larger than the picture needs (pacs_ai.film.pixels.display_picture), and only the reduced picture is
held in colour, never a full-resolution float copy of the film or the map. `picture_film` draws
the film's grey part from a decode made for the model input where the codec would decode no
finer for the picture (pacs_ai.classify.helper_processes keeps it from the film's one decode).
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
from pacs_ai.film.pixels import decodes_alike, display_from_decoded, display_picture
from pacs_ai.film.pixels_reduced import SmallDecode
from pacs_ai.finding import probability_label
from pacs_ai.model import heatmap
from pacs_ai.model.model import ModelInfo
from pacs_ai.report.report import instance_number, patient_and_study, site_settings_part
from pacs_ai.report.uids import heatmap_series_uid, heatmap_uid

MAX_SIDE = 1024  # longest side of the picture's film part, in pixels
SHOWN_FROM = 0.2  # of the map's maximum: weaker saliency leaves the film grey
OPACITY = 0.5  # of the colour at the map's maximum
WARNING_TEXT = "AI heat map - not for diagnosis"
SERIES_DESCRIPTION = "pacs-ai heat map (AI, not for diagnosis)"
DEFAULT_SERIES_NUMBER = 9902  # after the reports' 9901
OUTLINE_COLOUR = (255, 255, 255)
BACKGROUND = (0, 0, 0)
WARNING_COLOUR = (255, 255, 0)
TEXT_COLOUR = (255, 255, 255)
LEGEND_COLOUR = (200, 200, 200)
BAND_MIN_WIDTH_IN_TEXT = 30  # the words' band is at least this many text heights wide
SCALE_TICKS = (1.0, 0.8, 0.6, 0.4, 0.2)  # of the map's maximum, the scale's tick labels
LEGEND_TEXT = (
    "Colour: how strongly each area drove the AI score, relative to this film's strongest "
    f"(scale at right; not coloured below {SHOWN_FROM:.1f}). White outline: the reported region, "
    f"around the areas at {heatmap.REGION_FRACTION:.1f} and above (white mark on the scale).")


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
    array in [0, 1] (pacs_ai.film.pixels.display_picture: possibly decoded smaller)."""
    picture = Image.fromarray(np.ascontiguousarray(display, dtype=np.float32), mode="F")
    resized = picture.resize((columns, rows), Image.Resampling.BILINEAR, box=box)
    # scaled and rounded to 8 bits in Pillow's C loops (values outside 0..255 are clipped)
    return np.asarray(resized.point(lambda value: value * 255.0 + 0.5).convert("L"))


def picture_film(source: Dataset, decoded: SmallDecode | None = None) -> np.ndarray | None:
    """The film's grey part of the picture (film_grey at picture_size) from a dataset with
    its Pixel Data. `decoded`: its stored values as decoded for another size (the model
    input's); used when decoding for the picture would give the same (pixels.decodes_alike),
    else None is returned and nothing is decoded. Without `decoded` the film is decoded here."""
    rows, columns = picture_size(int(source.Rows), int(source.Columns))
    if decoded is None:
        picture = display_picture(source, min_size=min(rows, columns))
    elif decodes_alike(source, decoded, min(rows, columns)):
        picture = display_from_decoded(source, decoded, min(rows, columns))
    else:
        return None
    return film_grey(picture.values, picture.box, rows, columns)


def render(display: np.ndarray | None, box: tuple[float, float, float, float] | None,
           film_rows: int, film_columns: int, grid: np.ndarray, region: np.ndarray | None,
           caption: str, *, film: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 picture: the film (its region `box` of `display`, or `film` as picture_film
    drew it) with its normalised map grid in colour and the reported region (film
    coordinates, or None) outlined, at the top left; the colour scale in a strip to its right;
    the words in a band below both. The strip and the band add area: every film pixel outside
    the map's colour and the outline is the film's own grey, where it would be without them (a
    marker or label on the film stays visible)."""
    rows, columns = picture_size(film_rows, film_columns)
    if film is None:
        film = film_grey(display, box, rows, columns)
    elif film.shape != (rows, columns) or film.dtype != np.uint8:
        raise ValueError(f"the film's picture is {film.shape} {film.dtype}, "
                         f"expected ({rows}, {columns}) uint8")
    film = Image.fromarray(film, mode="L").convert("RGB")
    strength = heatmap.upsampled(grid, rows, columns)  # corners to corners, like the film
    levels = Image.fromarray(
        np.clip(strength * (_LEVELS - 1) + 0.5, 0, _LEVELS - 1).astype(np.uint8), mode="L")
    colours = levels.copy()
    colours.putpalette(_PALETTE)
    film.paste(colours.convert("RGB"), (0, 0), levels.point(_OPACITY_TABLE))
    if region is not None:
        scale = np.array([columns / film_columns, rows / film_rows])
        ImageDraw.Draw(film).line([tuple(point) for point in (np.asarray(region) * scale).tolist()],
                                  fill=OUTLINE_COLOUR, width=outline_width(rows))
    size = text_size(rows, columns)
    strip = _scale_strip(size, rows)
    # a small film's band is wider than the film, so that its lines still hold several words
    band = _text_band(size, caption, max(columns + strip.width, BAND_MIN_WIDTH_IN_TEXT * size))
    picture = Image.new("RGB", (band.width, rows + band.height), BACKGROUND)
    picture.paste(film, (0, 0))
    picture.paste(strip, (columns, 0))
    picture.paste(band, (0, rows))
    return np.asarray(picture)


def outline_width(rows: int) -> int:
    return max(1, rows // 400)


def text_size(rows: int, columns: int) -> int:
    """The words' height in pixels: in proportion to the picture, so that they read the same
    on a viewer that fits the picture to its screen, and never below 12 pixels."""
    return max(12, round(max(rows, columns) / 48))


# The scale and the fixed words are the same for every film of a size (a site's detectors give
# a few sizes): drawn once per helper process, then pasted (drawing them took about 8 ms a
# picture, against the image's 20 ms budget). The cached pictures are only pasted from.

@functools.lru_cache(maxsize=16)
def _scale_strip(size: int, rows: int) -> Image.Image:
    """The colour scale, `rows` high: a bar from the map's maximum (1.0, top) to SHOWN_FROM
    (bottom) with tick labels, and a white mark across it at REGION_FRACTION (the outline's
    level); `size`: the labels' text size."""
    font = _font(size)
    pad = max(2, size // 2)
    bar_width = size
    label_width = max(round(font.getlength(_tick_text(value))) for value in SCALE_TICKS)
    strip = Image.new("RGB", (pad + bar_width + pad + label_width + pad, rows), BACKGROUND)
    top, bottom = size, rows - size  # room for half a label above 1.0 and below the last tick
    height = bottom - top
    if height < len(SCALE_TICKS) * size:
        return strip  # too small a film for labels that do not overlap: the band explains

    def y_of(value: float) -> int:
        return top + round((1.0 - value) / (1.0 - SHOWN_FROM) * (height - 1))

    bar = np.repeat(colour_scale(np.linspace(1.0, SHOWN_FROM, height))[:, None, :], bar_width,
                    axis=1)
    strip.paste(Image.fromarray(bar, mode="RGB"), (pad, top))
    draw = ImageDraw.Draw(strip)
    mark = y_of(heatmap.REGION_FRACTION)
    # from the strip's edge across the bar, so it reads as a mark, not as one of the colours
    draw.line([(0, mark), (pad + bar_width - 1, mark)], fill=OUTLINE_COLOUR,
              width=max(2, outline_width(rows)))
    for value in SCALE_TICKS:
        y = y_of(value)
        draw.line([(pad + bar_width, y), (pad + bar_width + pad // 2, y)], fill=TEXT_COLOUR)
        text = _tick_text(value)
        _, text_top, _, text_bottom = font.getbbox(text)  # centred on its tick
        draw.text((pad + bar_width + pad, y - (text_top + text_bottom) // 2), text,
                  fill=TEXT_COLOUR, font=font)
    return strip


def _tick_text(value: float) -> str:
    return f"{value:.1f}"


def _text_band(size: int, caption: str, width: int) -> Image.Image:
    """A band `width` pixels wide holding the warning, the caption and the legend, one below
    the other, each wrapped."""
    pad = max(2, size // 2)
    blocks = [_fixed_text_block(WARNING_TEXT, WARNING_COLOUR, size, width - 2 * pad),
              _text_block(caption, TEXT_COLOUR, size, width - 2 * pad),
              _fixed_text_block(LEGEND_TEXT, LEGEND_COLOUR, size, width - 2 * pad)]
    band = Image.new("RGB", (width, 2 * pad + sum(block.height for block in blocks)),
                     BACKGROUND)
    top = pad
    for block in blocks:
        band.paste(block, (pad, top))
        top += block.height
    return band


def _text_block(text: str, colour: tuple[int, int, int], size: int,
                width: int) -> Image.Image:
    """The text in `colour` on the background, wrapped at word boundaries to `width` pixels
    (a word longer than that stays whole on its own line)."""
    font = _font(size)
    space = font.getlength(" ")
    lines: list[tuple[str, float]] = []  # each line and its width
    for word in text.split():
        length = font.getlength(word)
        if lines and lines[-1][1] + space + length <= width:
            lines[-1] = (f"{lines[-1][0]} {word}", lines[-1][1] + space + length)
        else:
            lines.append((word, length))
    step = size + size // 3
    block = Image.new("RGB", (width, step * max(1, len(lines))), BACKGROUND)
    draw = ImageDraw.Draw(block)
    for index, (line, _) in enumerate(lines):
        draw.text((0, index * step), line, fill=colour, font=font)
    return block


# the warning and the legend: the same words for every film (the caption differs)
_fixed_text_block = functools.lru_cache(maxsize=8)(_text_block)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def build_heatmap_image(header: Dataset, display: np.ndarray | None, grid: np.ndarray,
                        region: np.ndarray | None, probability: float, model: ModelInfo, *,
                        box: tuple[float, float, float, float] | None = None,
                        film: np.ndarray | None = None,
                        manufacturer: str = "pacs-ai",
                        series_number: int = DEFAULT_SERIES_NUMBER) -> Dataset:
    """The Secondary Capture for one source film. `header`: the checked source header
    (pacs_ai.report.report.source_header); `display`: its display array (pacs_ai.film.pixels, [0, 1]),
    `box` the film's region in it when it was decoded smaller (display_picture), or instead
    `film`, the film's part of the picture as picture_film drew it; `grid`: its normalised
    map; `region`: the reported region in film coordinates or None."""
    caption = (f"{model.name} {model.version}: pneumonia probability "
               f"{probability_label(probability)}")
    rows, columns = int(header.Rows), int(header.Columns)
    if film is None and box is None:
        box = (0, 0, display.shape[1], display.shape[0])
    pixels = render(display, box, rows, columns, grid, region, caption, film=film)
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
