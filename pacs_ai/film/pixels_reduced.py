"""Decode a film no larger than its model input needs (issue 16).

The model sees 200 x 200 pixels; a 2500 x 2048 film decoded, windowed and resized at full
resolution spends most of its CPU on pixels the resize then averages away. Here a film is
decoded smaller where its codec can do that for free, and otherwise averaged down in whole
boxes before the window and the resize; each side stays at least `min_size` pixels (twice the
model input), so the antialiased resize still averages several pixels into each input pixel.

- JPEG 2000: decoded at a reduced resolution level (the wavelet's low-pass image, Pillow's
  `reduce`), 3-4x less CPU per level skipped. Pillow returns the values offset to unsigned and
  shifted up to 8 or 16 bits; they are mapped back to the stored values exactly (a test compares
  level 0 with pydicom's decoder). Only when the codestream's precision and sign agree with Bits
  Stored and Pixel Representation; otherwise pydicom's decoder and its corrections are used.
- JPEG baseline (8-bit): decoded at 1/2, 1/4 or 1/8 scale by DCT scaling (Pillow's `draft`).
- Every other syntax: pydicom's decoder at full size; the caller averages it down in boxes
  (`box_reduce`) after the Modality LUT, which is thus applied exactly as before.

Anything unexpected (a codestream that does not match the header, a Pillow error) falls back to
the full decode, so a reduced decode never fails a film that the full decode reads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit

JPEG2000_SYNTAXES = (JPEG2000Lossless, JPEG2000)
JPEG_8BIT_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit)  # the latter may hold 8-bit data
DCT_SCALES = (8, 4, 2)  # libjpeg's 1/8, 1/4, 1/2 scaled decodes


def largest_factor(rows: int, columns: int, min_size: int, choices: tuple[int, ...]) -> int:
    """The largest factor in `choices` (or 1) whose ceil-divided size keeps both sides at least
    `min_size` (a reduced decode rounds its size up)."""
    for factor in sorted(choices, reverse=True):
        if -(-rows // factor) >= min_size and -(-columns // factor) >= min_size:
            return factor
    return 1


@dataclass(frozen=True)
class SmallDecode:
    """Stored values decoded smaller: the film's pixel coordinate x (Pillow's convention, pixel
    i spans [i, i + 1)) is at x / factor + offset in `stored` (the same for both axes)."""
    stored: np.ndarray
    factor: int
    offset: float = 0.0


def decode_small(ds: Dataset, syntax: UID, min_size: int) -> SmallDecode | None:
    """The film decoded at a reduced size, or None when this syntax or this film cannot be
    decoded smaller (the caller then decodes at full size)."""
    if syntax in JPEG2000_SYNTAXES:
        return _jpeg2000_small(ds, min_size)
    if syntax in JPEG_8BIT_SYNTAXES:
        return _jpeg_small(ds, min_size)
    return None


def reduction_factor(ds: Dataset, syntax: UID, min_size: int) -> int:
    """The factor decode_small would decode this film smaller by for `min_size` (1: it would
    not, the full decode), read from the header and the codestream's header alone. A decode
    that then fails falls back to the full decode, so its factor is 1 whatever this says."""
    if syntax in JPEG2000_SYNTAXES:
        header = _jpeg2000_fit(ds, _first_frame(ds))
        return 2 ** _jpeg2000_level(ds, header, min_size) if header is not None else 1
    if syntax in JPEG_8BIT_SYNTAXES and _jpeg_fits(ds):
        return largest_factor(int(ds.Rows), int(ds.Columns), min_size, DCT_SCALES)
    return 1


def box_reduce(values: np.ndarray, min_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Average `values` (stored integers or float) in boxes of whole pixels, each side at least
    `min_size` after (the last box of a row or column averages what is left); returns float32
    means (`values` itself when already small) and the box's (height, width)."""
    rows, columns = values.shape
    down, across = max(1, rows // min_size), max(1, columns // min_size)
    if down == 1 and across == 1:
        return values, (1, 1)
    # sums of strided slices, in place: numpy's reductions over small inner axes are slow, and
    # a fresh full-size array costs more in page faults than the sums; float32 is exact for up
    # to 256 16-bit values per box
    means = _strided_sums(_strided_sums(values, down, axis=0), across, axis=1)
    means *= np.float32(1.0 / (down * across))
    if rows % down:  # the last row of boxes holds fewer rows
        means[-1] *= np.float32(down / (rows % down))
    if columns % across:
        means[:, -1] *= np.float32(across / (columns % across))
    return means, (down, across)


def _strided_sums(values: np.ndarray, step: int, axis: int) -> np.ndarray:
    """float32 sums of each `step` consecutive rows (axis 0) or columns (axis 1), the last
    group possibly shorter; `values` itself for a step of 1."""
    if step == 1:
        return values

    def every(start: int) -> np.ndarray:
        return values[start::step] if axis == 0 else values[:, start::step]

    sums = every(0).astype(np.float32)
    for start in range(1, step):
        part = every(start)
        if axis == 0:
            sums[:part.shape[0]] += part
        else:
            sums[:, :part.shape[1]] += part
    return sums


# --- JPEG 2000 ------------------------------------------------------------------------------

def _jpeg2000_small(ds: Dataset, min_size: int) -> SmallDecode | None:
    frame = _first_frame(ds)
    header = _jpeg2000_fit(ds, frame)
    if header is None:
        return None
    level = _jpeg2000_level(ds, header, min_size)
    if level == 0:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    try:
        decoded = decode_jpeg2000_level(frame, level, header, int(ds.BitsAllocated))
    except Exception:  # Pillow's errors on a stream pydicom's decoder may still read
        return None
    if decoded.shape != (-(-rows // 2 ** level), -(-columns // 2 ** level)):
        return None
    # the low-pass sample i of level n sits on the film's pixel 2**n * i (ISO 15444-1 F.3),
    # not in the middle of a 2**n box: a shift of half a pixel less half a reduced pixel
    return SmallDecode(decoded, 2 ** level, 0.5 - 0.5 / 2 ** level)


def _jpeg2000_fit(ds: Dataset, frame: bytes) -> Jpeg2000Header | None:
    """The codestream's header when it agrees with the dataset's (size, sign, precision), so
    that a level can be decoded here; None: pydicom's decoder, which corrects such files."""
    header = jpeg2000_header(frame)
    if header is None:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
    if (header.rows, header.columns) != (int(ds.Rows), int(ds.Columns)) \
            or header.signed != signed or header.precision != bits_stored:
        return None
    return header


def _jpeg2000_level(ds: Dataset, header: Jpeg2000Header, min_size: int) -> int:
    """The coarsest resolution level whose sides keep at least `min_size` pixels (0: full)."""
    choices = tuple(2 ** n for n in range(1, header.levels + 1))
    return largest_factor(int(ds.Rows), int(ds.Columns), min_size, choices).bit_length() - 1


@dataclass(frozen=True)
class Jpeg2000Header:
    """What a codestream says about its one component (SIZ and COD markers)."""
    rows: int
    columns: int
    precision: int
    signed: bool
    levels: int


def jpeg2000_header(frame: bytes) -> Jpeg2000Header | None:
    """The SIZ and COD fields of a single-component J2K codestream (PS3.5 A.4.4 stores the bare
    codestream, ISO 15444-1 A.5.1 and A.6.1), or None for anything else (JP2 boxes, several
    components, a per-component COC that could change the levels)."""
    if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 45:
        return None
    x_size, y_size, x_origin, y_origin = (int.from_bytes(frame[8 + 4 * i:12 + 4 * i], "big")
                                          for i in range(4))
    components = int.from_bytes(frame[40:42], "big")
    if components != 1:
        return None
    ssiz = frame[42]
    levels = _cod_levels(frame, 4 + int.from_bytes(frame[4:6], "big"))
    if levels is None:
        return None
    return Jpeg2000Header(rows=y_size - y_origin, columns=x_size - x_origin,
                          precision=(ssiz & 0x7F) + 1, signed=bool(ssiz & 0x80),
                          levels=levels)


def _cod_levels(frame: bytes, offset: int) -> int | None:
    """Decomposition levels from the main header's COD marker, walking the marker segments
    after SIZ up to the first tile (SOT); None without a COD, or with a COC (it could change
    them for the component)."""
    levels = None
    while offset + 4 <= len(frame):
        marker = frame[offset:offset + 2]
        if marker == b"\xff\x90":  # SOT: the main header ends
            return levels
        if marker == b"\xff\x53" or marker[:1] != b"\xff":
            return None
        if marker == b"\xff\x52" and offset + 10 <= len(frame):
            levels = frame[offset + 9]
        offset += 2 + int.from_bytes(frame[offset + 2:offset + 4], "big")
    return None


def decode_jpeg2000_level(frame: bytes, level: int, header: Jpeg2000Header,
                          bits_allocated: int) -> np.ndarray:
    """The codestream at resolution level `level` (0: full size) as stored values, in the dtype
    pydicom's decoder gives (uint/int of Bits Allocated). Pillow adds 2**(precision - 1) to a
    signed component and shifts the values up to fill 8 bits (precision <= 8) or 16."""
    with Image.open(io.BytesIO(frame)) as picture:
        picture.reduce = level
        picture.load()
        decoded = np.asarray(picture)
    output_bits = 8 if decoded.dtype == np.uint8 else 16
    values = (decoded.astype(np.int32) >> (output_bits - header.precision))
    if header.signed:
        values -= 1 << (header.precision - 1)
    kind = "int" if header.signed else "uint"
    return values.astype(f"{kind}{bits_allocated}")


# --- JPEG (8-bit) ---------------------------------------------------------------------------

def _jpeg_fits(ds: Dataset) -> bool:
    """8 bits allocated and stored, unsigned: else pydicom's decoder, which corrects fewer
    bits stored and signed values."""
    return (int(ds.BitsAllocated), int(ds.get("BitsStored", 8)),
            int(ds.get("PixelRepresentation", 0))) == (8, 8, 0)


def _jpeg_small(ds: Dataset, min_size: int) -> SmallDecode | None:
    if not _jpeg_fits(ds):
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    scale = largest_factor(rows, columns, min_size, DCT_SCALES)
    if scale == 1:
        return None  # full size: pydicom's decoder, exactly as before
    try:
        with Image.open(io.BytesIO(_first_frame(ds))) as picture:
            if picture.mode != "L" or picture.size != (columns, rows):
                return None
            # Pillow picks the largest scale whose floor-divided size is at least the request
            picture.draft("L", (columns // scale, rows // scale))
            decoded = np.asarray(picture)
    except Exception:  # Pillow's errors on a stream pydicom's decoder may still read
        return None
    if decoded.shape != (-(-rows // scale), -(-columns // scale)):
        return None  # libjpeg chose another scale than asked for
    return SmallDecode(decoded, scale)  # an 8 x 8 block's pixels become scale x scale


def _first_frame(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))
