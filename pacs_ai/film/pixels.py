"""DICOM pixels -> the display-oriented 2-D picture a radiologist sees.

This is the DICOM half of the pixel path; `pacs_ai.model.preprocessing.to_model_input` is the other half.
Steps, in the order of the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2):

1. Guards, before anything is decoded: pixel data present, a single monochrome frame, a
   supported bit depth, a declared size within `max_pixels`, and pixel data at least as long
   as the header declares. A failure raises `PixelDataError("<code>: <detail>")`.
2. Decode with pydicom's pixel handlers (pylibjpeg-libjpeg/-openjpeg/-rle and pyjpegls plug
   in for JPEG, JPEG-LS, JPEG 2000 and RLE). For the model (`display_picture(min_size=...)`),
   smaller where the codec allows, then averaged down in whole boxes (`pacs_ai.film.pixels_reduced`).
3. Modality LUT Sequence, else Rescale Slope/Intercept.
4. VOI: the first VOI LUT Sequence item, else the first Window Center/Width (LINEAR,
   LINEAR_EXACT or SIGMOID), else a robust window from the image's own histogram.
5. Polarity: MONOCHROME1, or Presentation LUT Shape INVERSE, is inverted once. The DX IOD
   requires INVERSE together with MONOCHROME1 (PS3.3 C.8.11.7), where it restates the same
   inversion, so the two together are not inverted twice.

The result is float32 in [0, 1], 0 black and 1 white.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_ai.config import DEFAULT_MAX_PIXELS
from pacs_ai.dicom_constants import COLOUR_PHOTOMETRICS, MONOCHROME
from pacs_ai.film.pixels_reduced import SmallDecode, box_reduce, decode_small, reduction_factor

# Robust window when the file has neither VOI LUT nor window: clip the outer 0.5 % each side,
# as viewers' "auto window" does, so a few hot or dead pixels do not set the contrast.
ROBUST_WINDOW_PERCENTILES = (0.5, 99.5)


class PixelDataError(ValueError):
    """The pixel data cannot be turned into a picture; str(error) is the recorded reason,
    "<code>: <detail>" with code one of: no-pixel-data, bad-pixel-header, too-large,
    multi-frame, colour, not-monochrome, unsupported-bit-depth, unsupported-transfer-syntax,
    truncated-pixel-data, decode-failed."""


def display_array(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decoded pixels with Modality LUT, VOI and polarity applied: float32 2-D in [0, 1]."""
    return display_picture(ds, max_pixels=max_pixels).values


@dataclass(frozen=True)
class DisplayPicture:
    """A display-oriented picture (float32 2-D in [0, 1] from a DICOM film; a PNG/JPEG's 8-bit
    array in `pacs_ai.film.film_input`) and the film's region in it, (left, top, right, bottom) in
    Pillow's box convention: the whole array at full size; for a film decoded smaller, its
    rows and columns divided by the reduction, shifted where the codec's pixels are (JPEG 2000),
    so that a resize maps exactly the film onto the model input (a tenth of a pixel's error
    there is visible in the model input)."""
    values: np.ndarray
    box: tuple[float, float, float, float]


def display_picture(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    min_size: int | None = None) -> DisplayPicture:
    """display_array, optionally smaller: with `min_size`, the film may be decoded and averaged
    down by whole factors as long as each side keeps at least `min_size` pixels
    (`pacs_ai.film.pixels_reduced`)."""
    check_pixel_header(ds, max_pixels=max_pixels)
    return display_from_decoded(ds, _decode(ds, min_size), min_size)


def decode_for_display(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                       min_size: int | None = None) -> SmallDecode:
    """The first half of display_picture: the header checked, the stored values decoded (as
    small as `min_size` allows). display_from_decoded makes pictures of it, at that size or a
    larger `min_size` where decodes_alike says the codec would not decode finer."""
    check_pixel_header(ds, max_pixels=max_pixels)
    return _decode(ds, min_size)


def decodes_alike(ds: Dataset, decoded: SmallDecode, min_size: int | None) -> bool:
    """Whether decoding `ds` for `min_size` would give `decoded` again: the codec reduces by
    the same factor (a native film is never reduced by its decoder, only averaged after)."""
    if min_size is None:
        return decoded.factor == 1
    try:
        return reduction_factor(ds, transfer_syntax(ds), min_size) == decoded.factor
    except Exception:  # an odd header: decode again rather than guess
        return False


def display_from_decoded(ds: Dataset, decoded: SmallDecode,
                         min_size: int | None = None) -> DisplayPicture:
    """display_picture's second half, from stored values decode_for_display gave; `decoded`
    is not changed, so one decode serves pictures of several sizes."""
    # float32 throughout, one working array per step: a 2500x2048 film is 20 MB per float32
    # copy, and every copy counts against the service's memory and time (issue 7)
    stored, down, across = decoded.stored, 1, 1
    # Averaged in boxes before the VOI, as a reduced decode is. A rescale is linear, so the
    # stored values are averaged before it (no full-size float array); a Modality LUT is not,
    # so it is applied at full size first, exactly as without reduction.
    modality_lut = bool(ds.get("ModalityLUTSequence"))
    if min_size is not None and not modality_lut:
        stored, (down, across) = box_reduce(stored, min_size)
    values = apply_modality(stored, ds)
    del stored
    if min_size is not None and modality_lut:
        values, (down, across) = box_reduce(values, min_size)
    display = apply_voi(values, ds, in_place=True)  # values is ours: no second 20 MB array
    del values
    if is_inverted(ds):
        np.subtract(1.0, display, out=display)
    left, top = decoded.offset / across, decoded.offset / down
    box = (left, top, left + int(ds.Columns) / (decoded.factor * across),
           top + int(ds.Rows) / (decoded.factor * down))
    if box[2] > display.shape[1] or box[3] > display.shape[0]:  # shifted past the last pixel
        display = np.pad(display, ((0, 1), (0, 1)), mode="edge")
    return DisplayPicture(display, box)


def check_pixel_header(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise PixelDataError unless the pixel data can be decoded safely as one grey frame.

    Only header values and the length of the Pixel Data value are read, so a hostile header
    (60000 x 60000, say) is refused before any memory is allocated for it.
    """
    if "PixelData" not in ds:
        kind = ("float pixel data is not supported" if "FloatPixelData" in ds
                or "DoubleFloatPixelData" in ds else "the dataset has no Pixel Data")
        raise PixelDataError(f"no-pixel-data: {kind} (an encapsulated file cut short also "
                             "loses its Pixel Data)")
    rows, columns = _positive_int(ds, "Rows"), _positive_int(ds, "Columns")
    frames = _frame_count(ds)
    if rows * columns * frames > max_pixels:
        raise PixelDataError(f"too-large: {rows} x {columns} pixels x {frames} frame(s) exceeds "
                             f"the limit of {max_pixels} pixels")
    if frames > 1:
        raise PixelDataError(f"multi-frame: {frames} frames; only single-frame images are read")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric in COLOUR_PHOTOMETRICS:
        raise PixelDataError(f"colour: Photometric Interpretation {photometric or '(none)'} "
                             f"with {samples} sample(s) per pixel; only grey images are read")
    if photometric not in MONOCHROME:
        raise PixelDataError(f"not-monochrome: Photometric Interpretation is "
                             f"{photometric or '(none)'!s}, not MONOCHROME1 or MONOCHROME2")
    bits_allocated = _positive_int(ds, "BitsAllocated")
    bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise PixelDataError(f"unsupported-bit-depth: Bits Allocated {bits_allocated}, Bits "
                             f"Stored {bits_stored}; 8 or 16 allocated and up to 16 stored are read")
    syntax = transfer_syntax(ds)
    if syntax.is_compressed:
        _check_encapsulated(ds, syntax)
    else:
        expected = rows * columns * frames * bits_allocated // 8
        actual = len(ds.PixelData)
        if actual < expected:
            raise PixelDataError(f"truncated-pixel-data: Pixel Data has {actual} bytes, the "
                                 f"header declares {rows} x {columns} x {bits_allocated} bits "
                                 f"= {expected} bytes")


def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax, from its file meta or how it was read."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little and implicit is not None:
        return UID("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
    raise PixelDataError("bad-pixel-header: no Transfer Syntax UID, so the pixel data "
                         "cannot be interpreted")


def _check_encapsulated(ds: Dataset, syntax: UID) -> None:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise PixelDataError(f"unsupported-transfer-syntax: no decoder for {syntax.name} "
                             f"({syntax})")
    fragment_bytes = _encapsulated_frame_bytes(bytes(ds.PixelData))
    if fragment_bytes == 0:
        raise PixelDataError("truncated-pixel-data: encapsulated Pixel Data holds no "
                             "compressed frame")


ITEM_TAG = b"\xfe\xff\x00\xe0"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"


def _encapsulated_frame_bytes(data: bytes) -> int:
    """Bytes in the fragment items after the Basic Offset Table (PS3.5 A.4), checking that
    every item is whole: a file cut short ends inside an item."""
    offset, items, total = 0, 0, 0
    while offset < len(data):
        tag = data[offset:offset + 4]
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM_TAG or offset + 8 > len(data):
            raise PixelDataError(f"truncated-pixel-data: encapsulated Pixel Data is malformed "
                                 f"at byte {offset} (expected an item)")
        length = int.from_bytes(data[offset + 4:offset + 8], "little")
        if length == 0xFFFFFFFF or offset + 8 + length > len(data):
            raise PixelDataError(f"truncated-pixel-data: fragment at byte {offset} declares "
                                 f"{length} bytes, {len(data) - offset - 8} are present")
        total += length if items > 0 else 0  # item 0 is the Basic Offset Table
        items += 1
        offset += 8 + length
    return total


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Stored pixel values as a 2-D array (call check_pixel_header first), possibly a read-only
    view of the Pixel Data bytes.

    The decoder is called directly rather than through `ds.pixel_array`, which would also keep
    the array on the dataset for as long as the dataset lives (10 MB more per film).
    """
    return _decode(ds, None).stored


def _decode(ds: Dataset, min_size: int | None) -> SmallDecode:
    """decode_pixels, and with `min_size` decoded smaller where the codec can (JPEG 2000
    resolution levels, JPEG DCT scaling), each side still at least `min_size`."""
    from pydicom.pixels import get_decoder

    try:
        syntax = transfer_syntax(ds)
        decoded = decode_small(ds, syntax, min_size) if min_size else None
        if decoded is None:
            decoded = SmallDecode(get_decoder(syntax).as_array(ds, view_only=True)[0], 1)
    except MemoryError:
        raise PixelDataError("decode-failed: out of memory while decoding") from None
    except Exception as error:  # decoders raise RuntimeError, ValueError, their own kinds
        raise PixelDataError(f"decode-failed: {transfer_syntax(ds).name}: "
                             f"{type(error).__name__}: {error}") from None
    if decoded.stored.ndim != 2:
        raise PixelDataError(f"decode-failed: decoded pixels have shape "
                             f"{decoded.stored.shape}, expected one 2-D frame")
    return decoded


def apply_modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT Sequence, else Rescale Slope/Intercept; a new float32 array out (exact for
    stored values up to 24 bits)."""
    modality_luts = ds.get("ModalityLUTSequence")
    if modality_luts:
        return _lookup(stored, modality_luts[0], ds)[0]
    slope = _rescale_number(ds, "RescaleSlope", 1.0)
    intercept = _rescale_number(ds, "RescaleIntercept", 0.0)
    values = stored.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _rescale_number(ds: Dataset, keyword: str, default: float) -> float:
    """Rescale Slope or Intercept (`default` when absent or empty). pydicom gives an invalid DS
    (a decimal comma, say) as its text; unlike a window, a rescale cannot be done without."""
    value = ds.get(keyword, default) or default
    try:
        return float(value)
    except (TypeError, ValueError):
        name = "Rescale Slope" if keyword == "RescaleSlope" else "Rescale Intercept"
        raise PixelDataError(f"bad-pixel-header: {name} is {str(value)!r}, not a "
                             "number") from None


def apply_voi(values: np.ndarray, ds: Dataset, *, in_place: bool = False) -> np.ndarray:
    """Map modality values to [0, 1]: VOI LUT Sequence, else window, else robust window.
    `in_place`: a window may overwrite `values` (float32) instead of making a new array."""
    voi_luts = ds.get("VOILUTSequence")
    if voi_luts:
        mapped, output_bits = _lookup(values, voi_luts[0], ds)
        full_scale = max(float(2 ** output_bits - 1), float(mapped.max(initial=0.0)), 1.0)
        mapped /= np.float32(full_scale)  # mapped is our own new array
        return mapped
    window = first_window(ds)
    if window is not None:
        center, width = window
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        return apply_window(values, center, width, function, in_place=in_place)
    return robust_window(values, in_place=in_place)


def first_window(ds: Dataset) -> tuple[float, float] | None:
    """The first Window Center/Width pair, or None when absent or unusable (width < 1, or not
    numbers: pydicom gives an invalid DS, such as a decimal comma, as its text)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    try:
        center_value = float(_first(center))
        width_value = float(_first(width))
    except (TypeError, ValueError):
        return None  # a viewer falls back to its auto window; so does apply_voi
    if not np.isfinite(center_value) or not np.isfinite(width_value) or width_value < 1:
        return None
    return center_value, width_value


def apply_window(values: np.ndarray, center: float, width: float,
                 function: str = "LINEAR", *, in_place: bool = False) -> np.ndarray:
    """Window to [0, 1] by the VOI LUT Function's formula (PS3.3 C.11.2.1.2); `in_place` lets
    the linear windows write into `values` when it is float32."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return _scale_and_clip(values, center - 0.5 * width, width, in_place)
    # LINEAR: the classic window with its half-pixel offsets.
    if width <= 1:
        return (values > center - 0.5).astype(np.float32)
    return _scale_and_clip(values, center - 0.5 - 0.5 * (width - 1), width - 1, in_place)


def _scale_and_clip(values: np.ndarray, low: float, span: float,
                    in_place: bool = False) -> np.ndarray:
    """(values - low) / span clipped to [0, 1] (float32 for float32 input), into `values`
    itself when `in_place` and it is a writeable float32 array, else into a new array."""
    dtype = np.float32 if values.dtype == np.float32 else np.float64
    reuse = in_place and values.dtype == np.float32 and values.flags.writeable
    out = np.subtract(values, low, dtype=dtype, out=values if reuse else None)
    out *= dtype(1.0 / span)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_window(values: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Linear window from the image's own 0.5th to 99.5th percentile, to [0, 1]."""
    sample = values.ravel()[:: max(1, values.size // 1_000_000)]  # percentiles of <= ~1 Mpx
    low, high = (float(v) for v in np.percentile(sample, ROBUST_WINDOW_PERCENTILES))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return _scale_and_clip(values, low, high - low, in_place)


def is_inverted(ds: Dataset) -> bool:
    """True when white on the display is the lowest value: MONOCHROME1 or INVERSE (once)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _lookup(values: np.ndarray, item: Dataset, ds: Dataset) -> tuple[np.ndarray, int]:
    """Apply one LUT item (LUT Descriptor + LUT Data); returns values and the entry bit depth."""
    try:
        entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 65536  # 0 means 2**16 entries
        if first_mapped >= 32768 and int(ds.get("PixelRepresentation", 0)) == 1:
            first_mapped -= 65536  # Descriptor read as US but the pixels are signed
        raw = item.LUTData
        if isinstance(raw, (bytes, bytearray)):
            table = np.frombuffer(raw, dtype="<u2")[:entries]
        else:
            table = np.atleast_1d(np.asarray(raw, dtype=np.int64))[:entries]
        if table.size == 0:
            raise ValueError("LUT Data is empty")
    except (AttributeError, TypeError, ValueError, KeyError) as error:
        raise PixelDataError(f"bad-pixel-header: unusable LUT ({error})") from None
    index = np.clip(np.rint(values - first_mapped), 0, table.size - 1).astype(np.intp)
    return table.astype(np.float32)[index], bits


def _positive_int(ds: Dataset, keyword: str) -> int:
    value: Any = ds.get(keyword)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise PixelDataError(f"bad-pixel-header: {keyword} is {value!r}, a positive number "
                             "is required")
    return number


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        raise PixelDataError(f"bad-pixel-header: Number of Frames is "
                             f"{ds.get('NumberOfFrames')!r}") from None


def _first(value: Any) -> Any:
    """First value of a possibly multi-valued element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0]
    return value
