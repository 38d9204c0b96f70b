"""What the listener reads from a received dataset, and checks in it before it answers Success.

Success tells the modality it may forget the image, so whatever can be found wrong cheaply while
the dataset is in hand is refused instead (0xC000 with the reason as Error Comment), and the
modality's queue keeps the image: the dataset must parse up to its Pixel Data, the header
must declare no more pixels (Rows x Columns x Number of Frames) than [limits] max_pixels, whatever
the transfer syntax (the worker would never decode more: `too-large`), the Pixel Data element
must be whole (every fragment item and the sequence delimiter of encapsulated data), and for
uncompressed syntaxes it must hold at least the bytes Rows x Columns x Number of Frames x
Samples per Pixel x Bits Allocated declare. Only the element headers are read: the pixels are
never copied. What cannot be checked here (a corrupt compressed stream, say) fails later in the
worker, as before.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pacs_ai.config import LimitsConfig
from pacs_ai.receive.inflation import InflatedHead

PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM_TAG = 0xFFFEE000
SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
PIXEL_DATA_HEADER_BYTES = 12  # tag, VR, reserved and 4-byte length (explicit VR)
LONG_LENGTH_VRS = (b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"SQ", b"SV", b"UC", b"UN",
                   b"UR", b"UT", b"UV")


class ReceivedDataError(ValueError):
    """The received dataset is incomplete, malformed or too large to decode; str(error) is
    "<code>: <detail>" with code no-pixel-data, truncated-pixel-data or too-large."""


def check_declared_size(header: Dataset, max_pixels: int) -> None:
    """Raise ReceivedDataError when the header declares more than `max_pixels` pixels (Rows x
    Columns x frames), the limit the worker decodes within (pacs_ai.film.pixels). Values that are
    not usable numbers are left to the worker, which fails the job with bad-pixel-header."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return
    if min(rows, columns, frames) > 0 and rows * columns * frames > max_pixels:
        # short enough for the Error Comment (64 characters)
        raise ReceivedDataError(f"too-large: {rows} x {columns} x {frames} frame(s) > "
                                f"max_pixels {max_pixels}")


def check_pixel_data(header: Dataset, stream: BytesIO, syntax: UID,
                     dataset_length: int | None = None) -> None:
    """Raise ReceivedDataError unless the Pixel Data element at `stream`'s position (where
    parsing `header` stopped) is present and whole, and long enough for the header's
    dimensions when uncompressed. `dataset_length`: the whole dataset's length where `stream`
    holds only its first bytes, through the Pixel Data element's header (a deflated dataset,
    pacs_ai.receive.inflation); None: `stream` holds all of it."""
    buffer = stream.getbuffer()
    try:
        length, value_start = _pixel_data_element(buffer, stream.tell(), syntax)
        if length == UNDEFINED_LENGTH:
            if not syntax.is_compressed:
                raise ReceivedDataError("truncated-pixel-data: uncompressed Pixel Data of "
                                        "undefined length")
            _check_items(buffer, value_start, syntax.is_little_endian)
            return
        arrived = (len(buffer) if dataset_length is None else dataset_length) - value_start
        if length > arrived:
            raise ReceivedDataError(f"truncated-pixel-data: Pixel Data declares {length} "
                                    f"bytes, {arrived} arrived")
    finally:
        buffer.release()
    if not syntax.is_compressed:
        _check_native_length(header, length)


def _pixel_data_element(buffer: memoryview, position: int, syntax: UID) -> tuple[int, int]:
    """(value length, value offset) of the Pixel Data element starting at `position`."""
    order = "little" if syntax.is_little_endian else "big"
    if position + 8 > len(buffer) or _tag(buffer, position, order) != PIXEL_DATA_TAG:
        raise ReceivedDataError("no-pixel-data: the dataset ends before its Pixel Data (an "
                                "element longer than the data, or a dataset cut short)")
    if syntax.is_implicit_VR:
        return int.from_bytes(buffer[position + 4:position + 8], order), position + 8
    vr = bytes(buffer[position + 4:position + 6])
    if vr in LONG_LENGTH_VRS:
        if position + 12 > len(buffer):
            raise ReceivedDataError("truncated-pixel-data: the dataset ends inside the Pixel "
                                    "Data element's header")
        return int.from_bytes(buffer[position + 8:position + 12], order), position + 12
    return int.from_bytes(buffer[position + 6:position + 8], order), position + 8


def _check_items(buffer: memoryview, offset: int, little_endian: bool) -> None:
    """Encapsulated Pixel Data (PS3.5 A.4): whole items up to the sequence delimiter."""
    order = "little" if little_endian else "big"
    while offset + 8 <= len(buffer):
        tag = _tag(buffer, offset, order)
        length = int.from_bytes(buffer[offset + 4:offset + 8], order)
        if tag == SEQUENCE_DELIMITER_TAG:
            return
        if tag != ITEM_TAG or length == UNDEFINED_LENGTH:
            raise ReceivedDataError(f"truncated-pixel-data: encapsulated Pixel Data is "
                                    f"malformed at byte {offset} (expected an item)")
        if offset + 8 + length > len(buffer):
            raise ReceivedDataError(f"truncated-pixel-data: a fragment declares {length} "
                                    f"bytes, {len(buffer) - offset - 8} arrived")
        offset += 8 + length
    raise ReceivedDataError("truncated-pixel-data: encapsulated Pixel Data ends without its "
                            "sequence delimiter")


def _check_native_length(header: Dataset, length: int) -> None:
    """Uncompressed Pixel Data must hold what the header declares. Unusable header values are
    left to the worker, which fails the job with bad-pixel-header."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        bits = int(header.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return
    if min(rows, columns, frames, samples, bits) <= 0:
        return
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if length < expected:
        raise ReceivedDataError(
            f"truncated-pixel-data: Pixel Data holds {length} bytes, the header declares "
            f"{rows} x {columns} x {frames} frame(s) x {samples} sample(s) x {bits} bits "
            f"= {expected} bytes")


def _tag(buffer: Any, offset: int, order: str) -> int:
    group = int.from_bytes(buffer[offset:offset + 2], order)
    element = int.from_bytes(buffer[offset + 2:offset + 4], order)
    return (group << 16) | element


def header_values(dataset: Dataset) -> dict[str, str | None]:
    """Modality, Station Name (what [[routes]] match on) and Accession Number, as recorded with
    the job; a value pydicom cannot read is recorded as absent."""
    values: dict[str, str | None] = {}
    for field, keyword in (("modality", "Modality"), ("station_name", "StationName"),
                           ("accession_number", "AccessionNumber")):
        try:
            value = str(dataset.get(keyword, "") or "").strip()
        except Exception:  # a malformed element: routing treats it as missing
            value = ""
        values[field] = value[:64] or None
    return values


def received_header(stream: BytesIO, syntax: UID, limits: LimitsConfig) -> Dataset:
    """The received dataset up to its pixel data (all the listener reads are three UIDs), once
    it is known to declare no more than [limits] max_pixels and its Pixel Data element to be
    whole (ReceivedDataError if not).

    `stream`: the C-STORE request's encoded dataset (pynetdicom's `event.request.DataSet`) in
    `syntax`. pynetdicom's `event.dataset` would decode the whole stream, copying a 10 MB film's
    pixels once more for as long as the handler runs (fsync included). A deflated stream is inflated in chunks as
    far as the header goes and the rest only counted, never past max_dataset_bytes
    (pacs_ai.receive.inflation, DatasetTooLarge): 1 MB can inflate to gigabytes.
    """
    stream.seek(0)
    deflated = syntax == DeflatedExplicitVRLittleEndian
    if deflated:
        stream = InflatedHead(stream, limits.max_dataset_bytes)
    header = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                          stop_when=lambda tag, vr, length: tag >= PIXEL_DATA_TAG)
    check_declared_size(header, limits.max_pixels)  # before a deflated rest is inflated
    dataset_length = None
    if deflated:
        stream.keep(PIXEL_DATA_HEADER_BYTES)
        dataset_length = stream.finish()
    check_pixel_data(header, stream, syntax, dataset_length)
    return header
