"""A received Deflated Explicit VR Little Endian dataset, read in bounded memory.

Such a dataset arrives as its compressed bytes, and 1 MB of them can inflate to a gigabyte.
The listener needs only the header up to Pixel Data and the dataset's inflated length (to
check that the pixels are all there), so the inflated dataset is never held: `InflatedHead`
inflates in chunks of at most CHUNK_BYTES as the header parser reads, keeps those bytes (the
head: at most HEAD_LIMIT_BYTES), and `finish()` counts the rest without keeping it, stopping
as soon as the count passes [limits] max_dataset_bytes. Memory per association is then the
received bytes, the head and one chunk, whatever the dataset declares or inflates to
(issue 23: six 1 GB bombs at once took the service from 304 MB to 2128 MB before,
`bench/deflate_bombs.py`). The received bytes are spooled as they came; only an accepted
dataset is ever inflated whole, by the worker.
"""

from __future__ import annotations

import zlib
from io import BytesIO

CHUNK_BYTES = 1024 * 1024  # inflated per step
INPUT_BYTES = 64 * 1024  # compressed bytes handed to zlib per step (its unconsumed tail)
# Everything before Pixel Data, inflated: a radiograph's attributes are kilobytes, overlays and
# an icon image a few MB; this is room for them many times over.
HEAD_LIMIT_BYTES = 16 * 1024 * 1024


class DatasetTooLarge(ValueError):
    """A deflated dataset inflates past [limits] max_dataset_bytes, or holds more than
    HEAD_LIMIT_BYTES before its Pixel Data."""


class InflatedHead(BytesIO):
    """A readable, seekable stream of the inflated dataset's first bytes, for pydicom's
    `read_dataset`: each read inflates as far as it needs (a corrupt stream: zlib.error).
    `received` is the compressed dataset (raw deflate, PS3.5 A.5), read from its start."""

    def __init__(self, received: BytesIO, max_bytes: int,
                 head_limit: int = HEAD_LIMIT_BYTES) -> None:
        super().__init__()
        self._received = received
        self._received.seek(0)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._max_bytes = max_bytes
        self._head_limit = min(head_limit, max_bytes)
        self._kept = 0

    def read(self, size: int | None = -1) -> bytes:
        wanted = self._head_limit + 1 if size is None or size < 0 else self.tell() + size
        self._keep_until(wanted)
        return super().read(size)

    def keep(self, size: int) -> None:
        """Have the `size` bytes after the position inflated (fewer where the dataset ends)."""
        self._keep_until(self.tell() + size)

    def finish(self) -> int:
        """The dataset's whole inflated length: what is kept, and the rest counted, not kept.
        DatasetTooLarge as soon as it passes max_bytes."""
        length = self._kept
        while chunk := self._inflate_chunk():
            length += len(chunk)
            if length > self._max_bytes:
                raise self._too_large()
        return length

    def _keep_until(self, end: int) -> None:
        if end <= self._kept:
            return
        position = self.tell()
        self.seek(self._kept)
        try:
            while self._kept < end and (chunk := self._inflate_chunk()):
                if self._kept + len(chunk) > self._head_limit:
                    raise self._too_large(before_pixels=self._head_limit < self._max_bytes)
                self.write(chunk)
                self._kept += len(chunk)
        finally:
            self.seek(position)

    def _inflate_chunk(self) -> bytes:
        """Up to CHUNK_BYTES more inflated bytes; b"" once the stream or the data ends."""
        while not self._inflater.eof:
            pending = self._inflater.unconsumed_tail or self._received.read(INPUT_BYTES)
            if not pending:
                break  # cut short: the parser finds the dataset incomplete
            chunk = self._inflater.decompress(pending, CHUNK_BYTES)
            if chunk:
                return chunk
        return b""

    def _too_large(self, before_pixels: bool = False) -> DatasetTooLarge:
        if before_pixels:
            return DatasetTooLarge(f"more than {self._head_limit} bytes before Pixel Data")
        return DatasetTooLarge(f"inflates to more than {self._max_bytes} bytes "
                               "([limits] max_dataset_bytes)")
