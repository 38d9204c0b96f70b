"""The DICOM identifiers more than one stage names: the SOP classes a chest film arrives as, the
SR kinds a report is written as, and the photometric interpretations the filters and the pixel
checks sort films by. Written once here, so the listener's config, the filters, the pixel path
and the report cannot disagree about them.
"""

from __future__ import annotations

# --- The SOP classes a chest film arrives as (PS3.4 B.5) ---------------------------------------
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"
FILM_SOP_CLASSES = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION_STORAGE, DX_FOR_PROCESSING_STORAGE)
# keyword -> UID: the config accepts either
SOP_CLASS_KEYWORDS = {
    "ComputedRadiographyImageStorage": CR_IMAGE_STORAGE,
    "DigitalXRayImageStorageForPresentation": DX_FOR_PRESENTATION_STORAGE,
    "DigitalXRayImageStorageForProcessing": DX_FOR_PROCESSING_STORAGE,
}
# UID -> the name a report's refusal gives
SOP_CLASS_NAMES = {
    CR_IMAGE_STORAGE: "CR Image Storage",
    DX_FOR_PRESENTATION_STORAGE: "Digital X-Ray Image Storage - For Presentation",
    DX_FOR_PROCESSING_STORAGE: "Digital X-Ray Image Storage - For Processing",
}

# --- The SR a report is written as: [report] sr_kind -> SOP Class UID ---------------------------
SR_KINDS = {
    "comprehensive3d": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
    "comprehensive": "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
}
DEFAULT_SR_KIND = "comprehensive3d"

# --- Photometric Interpretation (PS3.3 C.7.6.3.1.2) -------------------------------------------
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR_PHOTOMETRICS = ("RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
                       "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "ARGB", "CMYK", "HSV")
