"""What kind of film arrived, as metric labels (pacs_ai_arrivals_total): manufacturer, modality,
photometric interpretation, transfer syntax and pixel spacing band.

A new device, a vendor's software update that changes the processing, or a modality starting to
send lossy JPEG are the commonest reasons a model stops fitting a site; these counts show them
arriving. Each label takes its values from a bounded set, so the number of series stays small
whatever the headers hold: free text is matched against known values and anything else becomes
"other" ("none" when the element is absent or empty, "invalid" when it cannot be read). Nothing
here identifies a patient.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import AllTransferSyntaxes

from pacs_ai.dicom_constants import COLOUR_PHOTOMETRICS, MONOCHROME

NONE = "none"
OTHER = "other"
INVALID = "invalid"

# Manufacturer (0008,0070) is free text ("GE Healthcare", "FUJIFILM Corporation", "Carestream
# Health"): the first vendor whose pattern matches it, case-insensitive, names it. The radiography
# vendors and detector makers commonly seen; a site's other devices read "other".
MANUFACTURERS = (
    ("agfa", r"agfa"),
    ("canon", r"canon"),
    ("careray", r"careray"),
    ("carestream", r"carestream"),
    ("drgem", r"drgem"),
    ("fujifilm", r"fuji"),
    ("ge", r"\bge\b|\bgehc\b|general electric"),
    ("hitachi", r"hitachi"),
    ("hologic", r"hologic"),
    ("iray", r"\biray\b"),
    ("kodak", r"kodak"),
    ("konica-minolta", r"konica|minolta"),
    ("mindray", r"mindray"),
    ("neusoft", r"neusoft"),
    ("philips", r"philips"),
    ("rayence", r"rayence"),
    ("samsung", r"samsung"),
    ("sedecal", r"sedecal"),
    ("shimadzu", r"shimadzu"),
    ("siemens", r"siemens"),
    ("swissray", r"swissray"),
    ("toshiba", r"toshiba"),
    ("trixell", r"trixell"),
    ("united-imaging", r"united imaging|\buih\b"),
    ("varex", r"varex|varian"),
    ("vieworks", r"vieworks"),
    ("wandong", r"wandong"),
)
_MANUFACTURER_PATTERNS = tuple((name, re.compile(pattern, re.IGNORECASE))
                               for name, pattern in MANUFACTURERS)
# Modality (0008,0060): the projection radiography ones; anything else is "other".
MODALITIES = ("CR", "DX", "DR", "RG", "MG", "OT")
PHOTOMETRIC_INTERPRETATIONS = MONOCHROME + COLOUR_PHOTOMETRICS
_TRANSFER_SYNTAX_KEYWORDS = {str(uid): uid.keyword for uid in AllTransferSyntaxes}
# Pixel spacing in mm (the larger of row and column): band bounds. Chest detectors read
# 0.1-0.2 mm; a film exported downsized reads coarser.
PIXEL_SPACING_BOUNDS_MM = (0.1, 0.15, 0.2, 0.3, 0.5)


def manufacturer_label(value: str | None) -> str:
    text = (value or "").strip()
    if not text:
        return NONE
    for name, pattern in _MANUFACTURER_PATTERNS:
        if pattern.search(text):
            return name
    return OTHER


def _one_of(value: str | None, known: tuple[str, ...]) -> str:
    text = (value or "").strip().upper()
    if not text:
        return NONE
    return text if text in known else OTHER


def transfer_syntax_label(uid: str | None) -> str:
    """The syntax's pydicom keyword (ExplicitVRLittleEndian, JPEG2000Lossless...); "other" for
    a UID that is not one of the standard transfer syntaxes pydicom knows."""
    if not uid:
        return NONE
    return _TRANSFER_SYNTAX_KEYWORDS.get(str(uid).strip(), OTHER)


def pixel_spacing_band(spacing_mm: float | None) -> str:
    """"<0.1", "0.1-0.15", ... ">=0.5" (mm), or "none"."""
    if spacing_mm is None:
        return NONE
    bounds = PIXEL_SPACING_BOUNDS_MM
    if spacing_mm < bounds[0]:
        return f"<{bounds[0]:g}"
    for low, high in zip(bounds, bounds[1:]):
        if spacing_mm < high:
            return f"{low:g}-{high:g}"
    return f">={bounds[-1]:g}"


def pixel_spacing_labels() -> tuple[str, ...]:
    """Every band pixel_spacing_band gives, in order (for the guide and the dashboard)."""
    bounds = PIXEL_SPACING_BOUNDS_MM
    return ((f"<{bounds[0]:g}",) + tuple(f"{low:g}-{high:g}" for low, high in
                                         zip(bounds, bounds[1:])) + (f">={bounds[-1]:g}",))


def _spacing_mm(header: Dataset) -> float | None:
    """Pixel Spacing, else Imager Pixel Spacing: the larger of its two values, in mm. Raises
    ValueError when present but not two positive numbers."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value is None or value == "":
            continue
        values = [float(v) for v in (value if isinstance(value, MultiValue) else [value])]
        if len(values) != 2 or not all(0 < v < 1000 for v in values):
            raise ValueError(f"{keyword} is not two positive numbers")
        return max(values)
    return None


def arrival_labels(header: Dataset, transfer_syntax: str | None) -> dict[str, str]:
    """The labels of pacs_ai_arrivals_total for a received film's header (read up to its pixel
    data) and the transfer syntax it came in."""
    def read(reader, *args) -> str:
        try:
            return reader(*args)
        except Exception:  # a malformed element: counted, never a reason to refuse the film
            return INVALID

    def text(keyword: str) -> str | None:
        value = header.get(keyword)
        return None if value is None else str(value)

    return {
        "manufacturer": read(lambda: manufacturer_label(text("Manufacturer"))),
        "modality": read(lambda: _one_of(text("Modality"), MODALITIES)),
        "photometric_interpretation": read(lambda: _one_of(text("PhotometricInterpretation"),
                                                           PHOTOMETRIC_INTERPRETATIONS)),
        "transfer_syntax": read(transfer_syntax_label, transfer_syntax),
        "pixel_spacing_mm": read(lambda: pixel_spacing_band(_spacing_mm(header))),
    }
