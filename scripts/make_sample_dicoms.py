#!/usr/bin/env python3
"""Regenerate sample_dicoms/ from ../shared/data/originals/ (Kermany et al. 2018, CC BY 4.0).

Every sample is described once in SAMPLES below; the script writes the DICOM files, the
manifest.json that tests and other tools iterate over, and README.md (provenance, licence and
the table of samples), so the three cannot drift apart. Output is deterministic: UIDs derive from SEED and the sample's name, dates are
fixed, and the encoders are deterministic, so regenerating gives the same files.

    .venv/bin/python scripts/make_sample_dicoms.py [--originals DIR] [--out DIR]

Needs DCMTK's dcmcjpeg for the three JPEG (ISO 10918) syntaxes, which pydicom cannot encode;
JPEG-LS, JPEG 2000, RLE and deflate come from pydicom with pyjpegls / pylibjpeg-openjpeg.

How the pixels are made: the source JPEG is read as 8-bit grey (bright = dense, as a film is
shown), lightly smoothed with a 3 x 3 binomial kernel so that re-quantising to 12-16 bits
fills the intermediate grey levels the way a real detector does, then mapped linearly onto the
stored range of each variant (inverted for MONOCHROME1 and for Presentation LUT Shape INVERSE).
The window written into the header covers the 0.05th to 99.95th percentile of the modality
values, like a modality's default window.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (JPEG2000, UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ORIGINALS = REPO_ROOT.parent / "shared" / "data" / "originals"
DEFAULT_OUT = REPO_ROOT / "sample_dicoms"
SEED = "pacs-ai sample_dicoms v1"
MANIFEST_FORMAT = "pacs-ai-sample-dicoms/1"

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# Transfer syntaxes DCMTK's dcmcjpeg encodes (pydicom has no ISO 10918 encoder).
DCMCJPEG_MODES = {JPEGBaseline8Bit: "+eb", JPEGExtended12Bit: "+ee", JPEGLosslessSV1: "+e1"}
LOSSY_METHOD = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1",
                JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1"}
# SNOMED CT codes for the View Code and Anatomic Region sequences.
VIEW_CODES = {"PA": ("272479007", "postero-anterior"), "AP": ("399348003", "antero-posterior"),
              "LL": ("399173006", "left lateral")}
REGION_CODES = {"CHEST": ("816094009", "Chest"), "ABDOMEN": ("818981001", "Abdomen")}


@dataclass(frozen=True)
class Stored:
    """How modality values are stored: bit depth, signedness, rescale, polarity."""

    bits: int = 12
    signed: bool = False
    low: int = 200          # stored value of the darkest source grey (before inversion)
    high: int = 3900        # stored value of the brightest source grey
    slope: float = 1.0
    intercept: float = 0.0
    photometric: str = "MONOCHROME2"
    presentation_lut: str | None = None   # "IDENTITY" or "INVERSE"; inverse also flips storage

    @property
    def inverted(self) -> bool:
        return self.photometric == "MONOCHROME1" or self.presentation_lut == "INVERSE"


CR12 = Stored()
CR12_MONO1 = Stored(photometric="MONOCHROME1")
DX16 = Stored(bits=16, low=1200, high=61000, presentation_lut="IDENTITY")
# The DX IOD fixes Pixel Representation 0 and an identity rescale, so the signed, rescaled
# and MONOCHROME2-with-INVERSE variants are CR, where vendors do write them.
CR16_SIGNED = Stored(bits=16, signed=True, low=-28000, high=30000, slope=0.5, intercept=16384)
DX16_MONO1 = Stored(bits=16, low=900, high=58000, photometric="MONOCHROME1",
                    presentation_lut="INVERSE")
CR12_MONO2_INVERSE = Stored(bits=12, low=150, high=4000, presentation_lut="INVERSE")
DX14_PROCESSING = Stored(bits=14, low=2100, high=14800, presentation_lut="IDENTITY")
DX12 = Stored(bits=12, low=180, high=3950, presentation_lut="IDENTITY")
CR8 = Stored(bits=8, low=0, high=255)


@dataclass(frozen=True)
class Sample:
    name: str                        # file name without .dcm
    description: str
    source: str | None               # relative to the originals folder
    sop_class: str = CR_IMAGE
    stored: Stored = CR12
    syntax: str = ExplicitVRLittleEndian
    voi: str = "window"              # "window", "voi-lut" or "none"
    view: str = "PA"
    body_part: str = "CHEST"
    frames: int = 1
    expected_status: str = "ok"
    expected_reason: str | None = None
    broken: str | None = None        # "truncate", "huge" or "not-dicom"
    encoder_options: dict[str, Any] = field(default_factory=dict)


N = "train/NORMAL/"
P = "train/PNEUMONIA/"
SAMPLES: list[Sample] = [
    # --- Films the model must classify, uncompressed, both classes, CR and DX. ---
    Sample("cr_normal_pa_12bit", "CR, 12-bit unsigned, MONOCHROME2, window", N + "IM-0314-0001.jpeg"),
    Sample("cr_pneumonia_ap_12bit", "CR AP, 12-bit unsigned, MONOCHROME2, window",
           P + "person1177_bacteria_3125.jpeg", view="AP"),
    Sample("dx_normal_pa_16bit", "DX For Presentation, 16-bit unsigned, MONOCHROME2, window",
           N + "NORMAL2-IM-0468-0001.jpeg", sop_class=DX_PRESENTATION, stored=DX16),
    Sample("dx_pneumonia_ap_12bit", "DX For Presentation AP, 12-bit unsigned, MONOCHROME2, window",
           P + "person1812_bacteria_4667.jpeg", sop_class=DX_PRESENTATION, stored=DX12,
           view="AP"),
    Sample("cr_pneumonia_ap_16bit_signed",
           "CR AP, 16-bit signed, rescale slope 0.5 intercept 16384, window",
           P + "person1839_bacteria_4705.jpeg", stored=CR16_SIGNED, view="AP"),
    Sample("cr_pneumonia_pa_12bit_mono1", "CR, 12-bit, MONOCHROME1 (stored inverted), window",
           P + "person1471_bacteria_3831.jpeg", stored=CR12_MONO1),
    Sample("dx_normal_pa_16bit_mono1",
           "DX For Presentation, 16-bit, MONOCHROME1 with Presentation LUT Shape INVERSE "
           "(as the DX IOD requires), window", N + "NORMAL2-IM-0468-0001.jpeg",
           sop_class=DX_PRESENTATION, stored=DX16_MONO1),
    Sample("cr_pneumonia_pa_12bit_inverse_plut",
           "CR, 12-bit MONOCHROME2 stored inverted with Presentation LUT Shape INVERSE, window",
           P + "person992_bacteria_2919.jpeg", stored=CR12_MONO2_INVERSE),
    Sample("cr_normal_pa_12bit_voi_lut",
           "CR, 12-bit, VOI LUT Sequence (a vendor S-curve, 16-bit output) and no window",
           N + "IM-0314-0001.jpeg", voi="voi-lut"),
    Sample("cr_pneumonia_pa_12bit_no_window",
           "CR, 12-bit, neither VOI LUT nor window: the histogram window is used",
           P + "person1812_bacteria_4667.jpeg", voi="none"),
    Sample("dx_pneumonia_pa_14bit_for_processing",
           "DX For Processing, 14-bit, no window", P + "person1180_virus_2008.jpeg",
           sop_class=DX_PROCESSING, stored=DX14_PROCESSING, voi="none"),
    Sample("cr_normal_pa_12bit_implicit_vr", "CR, 12-bit, Implicit VR Little Endian",
           N + "IM-0314-0001.jpeg", syntax=ImplicitVRLittleEndian),
    Sample("cr_pneumonia_pa_12bit_deflated", "CR, 12-bit, Deflated Explicit VR Little Endian",
           P + "person137_virus_281.jpeg", syntax=DeflatedExplicitVRLittleEndian),
    # --- One per compressed transfer syntax, at the originals' resolution. ---
    Sample("cr_normal_pa_8bit_jpeg_baseline", "CR, 8-bit, JPEG Baseline (lossy, quality 90)",
           N + "IM-0214-0001.jpeg", stored=CR8, syntax=JPEGBaseline8Bit),
    Sample("cr_pneumonia_pa_12bit_jpeg_extended",
           "CR, 12-bit, JPEG Extended (process 4, lossy, quality 90)",
           P + "person341_virus_699.jpeg", syntax=JPEGExtended12Bit),
    Sample("dx_normal_pa_16bit_jpeg_lossless_sv1", "DX, 16-bit, JPEG Lossless SV1 (process 14)",
           N + "IM-0302-0001.jpeg", sop_class=DX_PRESENTATION, stored=DX16,
           syntax=JPEGLosslessSV1),
    Sample("cr_pneumonia_pa_12bit_mono1_jpegls_lossless", "CR, 12-bit, MONOCHROME1, JPEG-LS lossless",
           P + "person536_bacteria_2258.jpeg", stored=CR12_MONO1, syntax=JPEGLSLossless),
    Sample("dx_normal_pa_12bit_jpegls_near_lossless", "DX, 12-bit, JPEG-LS near-lossless (NEAR=3)",
           N + "IM-0319-0001.jpeg", sop_class=DX_PRESENTATION, stored=DX12,
           syntax=JPEGLSNearLossless, encoder_options={"jls_error": 3}),
    Sample("cr_pneumonia_ap_16bit_signed_j2k_lossless",
           "CR AP, 16-bit signed with rescale, JPEG 2000 lossless",
           P + "person1441_bacteria_3724.jpeg", stored=CR16_SIGNED, syntax=JPEG2000Lossless,
           view="AP"),
    Sample("cr_normal_pa_12bit_j2k_lossy", "CR, 12-bit, JPEG 2000 lossy (ratio 12:1)",
           N + "IM-0441-0001.jpeg", syntax=JPEG2000, encoder_options={"j2k_cr": [12]}),
    Sample("dx_pneumonia_pa_16bit_mono1_rle", "DX, 16-bit, MONOCHROME1 + INVERSE, RLE Lossless",
           P + "person549_virus_1089.jpeg", sop_class=DX_PRESENTATION, stored=DX16_MONO1,
           syntax=RLELossless),
    # --- Valid images the model was not made for: skipped, with a reason. ---
    Sample("skip_dx_chest_lateral",
           "DX chest, View Position LL (pixels are a frontal film relabelled: no lateral "
           "film is in the source data)", P + "person921_virus_1578.jpeg",
           sop_class=DX_PRESENTATION, stored=DX12, view="LL",
           expected_status="skipped", expected_reason="not-frontal"),
    Sample("skip_cr_abdomen",
           "CR with Body Part Examined ABDOMEN (pixels are a chest film relabelled)",
           P + "person1220_virus_2068.jpeg", body_part="ABDOMEN",
           expected_status="skipped", expected_reason="not-chest"),
    Sample("skip_ct_chest_slice", "CT Image Storage, one synthetic 512 x 512 axial chest slice "
           "(an ellipse phantom in Hounsfield units)", None, sop_class=CT_IMAGE,
           expected_status="skipped", expected_reason="unsupported-sop-class"),
    Sample("skip_dx_multiframe", "DX For Presentation with Number of Frames 2 (a dual-shot pair "
           "some detectors send as one object, outside the DX IOD)",
           P + "person921_virus_1578.jpeg", sop_class=DX_PRESENTATION, stored=DX12, frames=2,
           expected_status="skipped", expected_reason="multi-frame"),
    # --- Broken files: errors, with a reason, never a crash. ---
    Sample("broken_truncated_pixel_data",
           "CR, 12-bit, the file cut off 40 % into its Pixel Data (an interrupted copy)",
           P + "person1180_virus_2008.jpeg", broken="truncate",
           expected_status="error", expected_reason="truncated-pixel-data"),
    Sample("broken_60000x60000", "DX header declaring 60000 x 60000 16-bit pixels with 4 KiB "
           "of Pixel Data", None, sop_class=DX_PRESENTATION, stored=DX16, broken="huge",
           expected_status="error", expected_reason="too-large"),
    Sample("broken_not_dicom", "an HTML error page saved with a .dcm name", None,
           broken="not-dicom", expected_status="error", expected_reason="not-dicom"),
]


def uid_for(*parts: str) -> str:
    """A stable UID from the seed and the given names: 2.25 + a name-based UUID (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join([SEED, *parts])).int}"


def load_grey(path: Path) -> np.ndarray:
    """The source JPEG as the 8-bit grey picture every consumer sees (`convert("L")`)."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"), dtype=np.float64)


def dequantise(grey: np.ndarray) -> np.ndarray:
    """3 x 3 binomial smoothing, so a 12-16 bit re-quantisation has in-between grey levels."""
    padded = np.pad(grey, 1, mode="edge")
    rows = padded[:-2] + 2 * padded[1:-1] + padded[2:]
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 16.0


def store(grey: np.ndarray, stored: Stored) -> np.ndarray:
    """Map 0-255 display grey onto the stored range, inverted where the variant says."""
    values = grey if stored.bits == 8 else dequantise(grey)
    fraction = values / 255.0
    if stored.inverted:
        fraction = 1.0 - fraction
    pixels = np.rint(stored.low + fraction * (stored.high - stored.low))
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[
        (8 if stored.bits == 8 else 16, stored.signed)]
    return pixels.astype(dtype)


def ct_phantom() -> np.ndarray:
    """A 512 x 512 axial chest slice in HU: body, two lungs, spine, table-free air."""
    y, x = np.mgrid[-256:256, -256:256].astype(np.float64)
    hu = np.full((512, 512), -1000.0)
    hu[(x / 230) ** 2 + (y / 160) ** 2 <= 1] = 40.0                       # soft tissue
    for centre in (-95, 95):
        hu[((x - centre) / 80) ** 2 + ((y + 10) / 115) ** 2 <= 1] = -850.0  # lungs
    hu[(x / 28) ** 2 + ((y - 120) / 28) ** 2 <= 1] = 700.0                 # vertebra
    hu[(x / 45) ** 2 + ((y - 20) / 55) ** 2 <= 1] = 35.0                   # heart
    noise = np.random.default_rng(20180222).normal(0.0, 12.0, hu.shape)
    return np.rint(np.clip(hu + noise, -1024, 3071) + 1024).astype(np.uint16)


def base_dataset(sample: Sample, index: int, patient: int) -> Dataset:
    """Patient, study, series, equipment and instance attributes; obviously fake identity."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sample.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid_for("instance", sample.name)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sample.sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240301"
    ds.StudyTime = "091500"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"0916{index:02d}"
    ds.AccessionNumber = f"ZZACC{patient:05d}"
    ds.Modality = {CR_IMAGE: "CR", CT_IMAGE: "CT"}.get(sample.sop_class, "DX")
    ds.Manufacturer = "pacs-ai sample generator"
    ds.InstitutionName = "Synthetic Test Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = "ZZTESTXR1"
    ds.StudyDescription = "XR CHEST" if ds.Modality != "CT" else "CT CHEST"
    ds.SeriesDescription = sample.description[:64]
    ds.ManufacturerModelName = "make_sample_dicoms.py"
    ds.PatientName = f"ZZTEST^SAMPLE{patient:02d}"
    ds.PatientID = f"PACSAI-FAKE-{patient:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid_for("study", str(patient))
    ds.SeriesInstanceUID = uid_for("series", sample.name)
    ds.StudyID = f"ZZ{patient:04d}"
    ds.SeriesNumber = index + 1
    ds.InstanceNumber = 1
    ds.ImageComments = (f"Synthetic test image from {sample.source}; Kermany et al. 2018, "
                        "CC BY 4.0" if sample.source else "Synthetic test image")
    return ds


def add_radiograph_attributes(ds: Dataset, sample: Sample) -> None:
    """CR/DX series, positioning and detector attributes."""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = sample.body_part
    ds.ViewPosition = sample.view
    ds.PatientOrientation = ["L", "F"] if sample.view != "LL" else ["A", "F"]
    ds.ImagerPixelSpacing = [0.143, 0.143] if ds.Modality == "CR" else [0.148, 0.148]
    ds.KVP = 110 if sample.view == "PA" else 90
    ds.ExposureTime = 8
    ds.DistanceSourceToDetector = 1800
    ds.BurnedInAnnotation = "NO"
    region_value, region_meaning = REGION_CODES[sample.body_part]
    ds.AnatomicRegionSequence = Sequence([_code(region_value, "SCT", region_meaning)])
    if ds.Modality == "DX":
        view_value, view_meaning = VIEW_CODES[sample.view]
        view_item = _code(view_value, "SCT", view_meaning)
        view_item.ViewModifierCodeSequence = Sequence()
        ds.ViewCodeSequence = Sequence([view_item])
        ds.PositionerType = "NONE"
        ds.AcquisitionContextSequence = Sequence()
        ds.PresentationIntentType = ("FOR PROCESSING" if sample.sop_class == DX_PROCESSING
                                     else "FOR PRESENTATION")
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if sample.stored.inverted else -1


def add_pixels(ds: Dataset, pixels: np.ndarray, stored: Stored, frames: int = 1) -> None:
    """Image pixel attributes for one grey frame (or `frames` copies) of `pixels`."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = stored.photometric
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 8 if stored.bits == 8 else 16
    ds.BitsStored = stored.bits
    ds.HighBit = stored.bits - 1
    ds.PixelRepresentation = int(stored.signed)
    ds.RescaleIntercept = f"{stored.intercept:g}"
    ds.RescaleSlope = f"{stored.slope:g}"
    ds.RescaleType = "US"
    if stored.presentation_lut:
        ds.PresentationLUTShape = stored.presentation_lut
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = 500
        # The second exposure a little darker, as a dual-shot detector pair would be.
        second = np.rint(pixels.astype(np.float64) * 0.9).astype(pixels.dtype)
        ds.PixelData = np.stack([pixels, second]).tobytes()
    else:
        ds.PixelData = pixels.tobytes()
    ds.LossyImageCompression = "00"


def modality_values(pixels: np.ndarray, stored: Stored) -> np.ndarray:
    return pixels.astype(np.float64) * stored.slope + stored.intercept


def add_voi(ds: Dataset, pixels: np.ndarray, sample: Sample) -> None:
    """A default window over the data, or a VOI LUT Sequence, or neither."""
    values = modality_values(pixels, sample.stored)
    low, high = np.percentile(values, (0.05, 99.95))
    if sample.voi == "window":
        ds.WindowCenter = f"{round((low + high) / 2)}"
        ds.WindowWidth = f"{max(2, round(high - low))}"
        ds.WindowCenterWidthExplanation = "DEFAULT"
    elif sample.voi == "voi-lut":
        # An S-curve over the stored range, as CR vendors ship for chest films; 16-bit
        # entries (the VOI LUT Descriptor allows 8 or 16).
        entries = 2 ** sample.stored.bits
        x = np.arange(entries, dtype=np.float64)
        centre, spread = (low + high) / 2, (high - low) / 6
        curve = 1.0 / (1.0 + np.exp(-(x - centre) / spread))
        curve = (curve - curve.min()) / (curve.max() - curve.min())
        item = Dataset()
        # Ambiguous VRs (US or SS / US or OW): say US, as the pixels are unsigned.
        item.add_new(0x00283002, "US", [entries, 0, 16])           # LUT Descriptor
        item.LUTExplanation = "CHEST S-CURVE"
        item.add_new(0x00283006, "US", [int(v) for v in np.rint(curve * 65535)])  # LUT Data
        ds.VOILUTSequence = Sequence([item])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def build_ct(sample: Sample, index: int) -> Dataset:
    ds = base_dataset(sample, index, patient=90)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = uid_for("frame-of-reference", sample.name)
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [-175.0, -175.0, -120.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = -120.0
    ds.SliceThickness = 1.25
    ds.PixelSpacing = [0.68359375, 0.68359375]
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    pixels = ct_phantom()
    add_pixels(ds, pixels, Stored(bits=12, low=0, high=4095, intercept=-1024))
    ds.RescaleType = "HU"
    del ds.LossyImageCompression
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    return ds


def build_radiograph(sample: Sample, index: int, originals: Path, patient: int) -> Dataset:
    ds = base_dataset(sample, index, patient)
    add_radiograph_attributes(ds, sample)
    if sample.broken == "huge":
        add_pixels(ds, np.zeros((2, 2), dtype=np.uint16), sample.stored)
        ds.Rows = ds.Columns = 60000
        ds.PixelData = bytes(4096)
        return ds
    assert sample.source is not None
    pixels = store(load_grey(originals / sample.source), sample.stored)
    add_pixels(ds, pixels, sample.stored, sample.frames)
    add_voi(ds, pixels, sample)
    return ds


def encode(ds: Dataset, sample: Sample, workdir: Path) -> Dataset:
    """Switch to the sample's transfer syntax, compressing where it calls for it."""
    syntax = UID(sample.syntax)
    if not syntax.is_compressed:
        ds.file_meta.TransferSyntaxUID = syntax
        return ds
    native_bytes = len(ds.PixelData)
    if syntax in DCMCJPEG_MODES:
        ds = _dcmcjpeg(ds, syntax, workdir)
    else:
        ds.compress(syntax, generate_instance_uid=False, **sample.encoder_options)
    if syntax in LOSSY_METHOD:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = LOSSY_METHOD[syntax]
        ds.LossyImageCompressionRatio = f"{native_bytes / len(ds.PixelData):.2f}"
    return ds


def _dcmcjpeg(ds: Dataset, syntax: UID, workdir: Path) -> Dataset:
    tool = shutil.which("dcmcjpeg")
    if tool is None:
        sys.exit("dcmcjpeg not found: apt-get install dcmtk (it encodes the JPEG samples)")
    source, target = workdir / "native.dcm", workdir / "jpeg.dcm"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(source, enforce_file_format=True)
    # +un keeps our deterministic UIDs; -W writes pixels as they are (no windowing).
    quality = ["+q", "90"] if syntax in LOSSY_METHOD else []
    subprocess.run([tool, DCMCJPEG_MODES[syntax], "+un", "-W", *quality, str(source),
                    str(target)], check=True)
    encoded = pydicom.dcmread(target)
    if encoded.file_meta.TransferSyntaxUID != syntax:
        sys.exit(f"dcmcjpeg wrote {encoded.file_meta.TransferSyntaxUID}, wanted {syntax}")
    return encoded


def write_sample(sample: Sample, index: int, originals: Path, out: Path,
                 patients: dict[str, int], workdir: Path) -> dict[str, Any]:
    path = out / f"{sample.name}.dcm"
    entry: dict[str, Any] = {
        "file": path.name, "description": sample.description,
        "expected_status": sample.expected_status, "expected_reason": sample.expected_reason,
        "source": sample.source,
        "class": sample.source.split("/")[1] if sample.source else None,
    }
    if sample.broken == "not-dicom":
        path.write_text("<html><head><title>502 Bad Gateway</title></head>\n<body><h1>502 Bad "
                        "Gateway</h1><p>The PACS web viewer did not answer.</p></body></html>\n")
        return entry | _pixel_fields(None)
    if sample.sop_class == CT_IMAGE:
        ds = build_ct(sample, index)
    else:
        patient = patients.setdefault(sample.source or sample.name, len(patients) + 1)
        ds = build_radiograph(sample, index, originals, patient)
    ds = encode(ds, sample, workdir)
    ds.save_as(path, enforce_file_format=True)
    if sample.broken == "truncate":
        data = path.read_bytes()
        pixel_start = len(data) - len(ds.PixelData)
        path.write_bytes(data[: pixel_start + int(len(ds.PixelData) * 0.4)])
    return entry | _pixel_fields(ds)


def _pixel_fields(ds: Dataset | None) -> dict[str, Any]:
    if ds is None:
        keys = ("transfer_syntax", "transfer_syntax_name", "sop_class_uid", "modality",
                "photometric_interpretation", "presentation_lut_shape", "bits_stored",
                "pixel_representation", "rows", "columns", "number_of_frames", "lossy",
                "voi", "view_position", "body_part", "sop_instance_uid", "series_instance_uid",
                "study_instance_uid")
        return dict.fromkeys(keys)
    syntax = ds.file_meta.TransferSyntaxUID
    voi = "voi-lut" if "VOILUTSequence" in ds else "window" if "WindowCenter" in ds else "none"
    return {
        "transfer_syntax": str(syntax), "transfer_syntax_name": syntax.name,
        "sop_class_uid": str(ds.SOPClassUID), "modality": ds.Modality,
        "photometric_interpretation": ds.PhotometricInterpretation,
        "presentation_lut_shape": ds.get("PresentationLUTShape"),
        "bits_stored": int(ds.BitsStored), "pixel_representation": int(ds.PixelRepresentation),
        "rows": int(ds.Rows), "columns": int(ds.Columns),
        "number_of_frames": int(ds.get("NumberOfFrames", 1)),
        "lossy": ds.get("LossyImageCompression") == "01", "voi": voi,
        "view_position": ds.get("ViewPosition"), "body_part": ds.get("BodyPartExamined"),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
    }


README_HEAD = """\
# sample_dicoms: realistic chest radiographs, and hostile cases, for tests and demos

Generated by `scripts/make_sample_dicoms.py` (do not edit by hand; rerun it, it is
deterministic: same UIDs, same bytes). `manifest.json` lists every file with its expected
outcome through `pacs-ai classify` and the listener (`expected_status` ok / skipped / error and
the stable `expected_reason` code), its source image and class, transfer syntax, photometric
interpretation, UIDs and more; tests iterate over it.

## Where the images come from

The radiographs are pediatric chest X-rays from Kermany, Zhang, Goldbaum et al., "Identifying
Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning", Cell 172(5):1122-1131,
2018; data: "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for
Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, licensed CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/). The files here are adaptations: each source
JPEG from `shared/data/originals/` (named in the table and in `manifest.json`) was converted to
grey, smoothed with a 3 x 3 binomial kernel, re-quantised to 8-16 bits (inverted for
MONOCHROME1 and INVERSE variants), given synthetic DICOM headers and encoded in the listed
transfer syntax. The CT slice is a synthetic ellipse phantom. All the images keep the source's
resolution.

Patient names (`ZZTEST^SAMPLEnn`), IDs (`PACSAI-FAKE-nnnn`), accession numbers, institution
and dates are fake; no birth dates are set. The skip cases relabel a frontal chest film (the
source data has no lateral or abdominal films), as their descriptions say.

Known, deliberate deviations a validator (dciodvfy) reports: the multi-frame DX (the DX IOD
is single-frame), the MONOCHROME2 CR with Presentation LUT Shape INVERSE (some vendors write
it; it must still display right) and, by design, the three broken files.

## The samples

| file | expected | transfer syntax | what | source (in `shared/data/originals/`) |
| --- | --- | --- | --- | --- |
"""


def write_readme(out: Path, entries: list[dict[str, Any]]) -> None:
    rows = []
    for entry in entries:
        expected = entry["expected_status"]
        if entry["expected_reason"]:
            expected += f" ({entry['expected_reason']})"
        source = f"`{entry['source']}`" if entry["source"] else "-"
        rows.append(f"| `{entry['file']}` | {expected} | {entry['transfer_syntax_name'] or '-'} "
                    f"| {entry['description']} | {source} |")
    (out / "README.md").write_text(README_HEAD + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=Path, default=DEFAULT_ORIGINALS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (args.originals / "train").is_dir():
        sys.exit(f"originals not found at {args.originals} (expected train/NORMAL, train/PNEUMONIA)")
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.dcm"):
        stale.unlink()
    patients: dict[str, int] = {}
    entries = []
    with tempfile.TemporaryDirectory() as workdir:
        for index, sample in enumerate(SAMPLES):
            entries.append(write_sample(sample, index, args.originals, args.out, patients,
                                        Path(workdir)))
            print(f"{sample.name}.dcm", file=sys.stderr)
    manifest = {
        "format": MANIFEST_FORMAT,
        "generator": "scripts/make_sample_dicoms.py",
        "source_root": "shared/data/originals",
        "attribution": "Kermany, Zhang, Goldbaum et al., Cell 172(5):1122-1131, 2018; data: "
                       "Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0",
        "files": entries,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_readme(args.out, entries)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"{len(entries)} samples, {total / 1e6:.1f} MB in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
