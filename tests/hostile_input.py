"""Hostile input for the listener: a seeded fuzz corpus, malformed datasets, and raw-socket peers
that break off associations in the middle of a PDU.

- :func:`fuzz_corpus` makes a bounded, reproducible list of mutated instances (truncations and
  bit flips of sample files' data sets, each under a fresh SOP Instance UID so every mutation is a
  distinct instance for the service). :func:`write_mutation` turns one into a Part 10 file whose
  file meta is intact: :func:`send_raw_files` sends those data set bytes unparsed (pynetdicom's
  chunked send), exactly as a broken modality would put them on the wire.
- :func:`absurd_dimensions`, :func:`declaring`, :func:`wrong_vrs` build malformed but parseable
  instances; :func:`deflate_bomb` a small deflated one that inflates to any size
  (:func:`send_files_at_once`: several of them, each over its own association, together);
  :func:`corrupt_pixel_data` datasets cut short or with too few pixels for their header.
- :func:`associate_rq` encodes an A-ASSOCIATE-RQ by hand (PS3.8 9.3.2) and :data:`BROKEN_PEERS`
  are raw-socket behaviours: connect and leave, half a PDU, a PDU that announces more than it
  sends, garbage, an unknown PDU type, an association dropped in the middle of a P-DATA-TF;
  :func:`connect_burst` and :func:`silent_connections` are connections that never associate.
"""

from __future__ import annotations

import contextlib
import copy
import random
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless,
                         generate_uid)

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
FUZZ_SEED = 20240501


# --- fuzz corpus ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutation:
    """One fuzzed instance: where it came from, what was done, and its bytes."""

    name: str               # e.g. "cr-mono1.dcm:flip@1234x3"
    source: Path
    sop_class_uid: str
    sop_instance_uid: str   # fresh, so each mutation is its own instance
    transfer_syntax_uid: str
    # the mutated data set as it would travel (no file meta); kept out of repr and test logs
    dataset_bytes: bytes = field(repr=False)


def _dataset_bytes(dataset: Dataset, transfer_syntax: str) -> bytes:
    """The data set encoded in `transfer_syntax`, without preamble or file meta."""
    buffer = DicomBytesIO()
    syntax = pydicom.uid.UID(transfer_syntax)
    # Encapsulated syntaxes are explicit VR little endian on the wire, like their pixel items.
    buffer.is_little_endian = syntax.is_little_endian
    buffer.is_implicit_VR = syntax.is_implicit_VR
    pydicom.filewriter.write_dataset(buffer, dataset)
    return buffer.getvalue()


def fuzz_corpus(samples: Sequence[Path], *, count: int = 300, seed: int = FUZZ_SEED
                ) -> list[Mutation]:
    """`count` mutations of the samples, the same list for the same seed and samples.

    Half truncate the data set at a random point (biased towards the header, where the parser
    works hardest); half flip 1 to 16 random bits, a quarter of them within the first 2 KiB.
    """
    rng = random.Random(seed)
    originals = []
    for path in sorted(samples):
        dataset = pydicom.dcmread(path)
        originals.append((path, dataset, str(dataset.file_meta.TransferSyntaxUID)))
    if not originals:
        raise ValueError("fuzz_corpus needs at least one sample file")
    mutations: list[Mutation] = []
    for index in range(count):
        path, original, syntax = originals[index % len(originals)]
        dataset = copy.deepcopy(original)
        uid = generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=[
            str(seed), str(index)])
        dataset.SOPInstanceUID = uid
        data = bytearray(_dataset_bytes(dataset, syntax))
        if index % 2 == 0:
            header_bias = rng.random() < 0.6
            limit = min(len(data) - 1, 4096) if header_bias else len(data) - 1
            cut = rng.randint(1, max(1, limit))
            data = data[:cut]
            what = f"truncate@{cut}"
        else:
            flips = rng.randint(1, 16)
            span = min(len(data), 2048) if rng.random() < 0.25 else len(data)
            positions = sorted(rng.randrange(span) for _ in range(flips))
            for position in positions:
                data[position] ^= 1 << rng.randrange(8)
            what = f"flip@{positions[0]}x{flips}"
        mutations.append(Mutation(name=f"{path.name}:{what}", source=path,
                                  sop_class_uid=str(original.SOPClassUID),
                                  sop_instance_uid=uid, transfer_syntax_uid=syntax,
                                  dataset_bytes=bytes(data)))
    return mutations


def write_raw_part10(path: Path, *, sop_class_uid: str, sop_instance_uid: str,
                     transfer_syntax_uid: str, dataset_bytes: bytes) -> Path:
    """A Part 10 file: preamble, a correct file meta group, then `dataset_bytes` verbatim."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + dataset_bytes)
    return path


def write_mutation(mutation: Mutation, folder: Path, index: int) -> Path:
    return write_raw_part10(folder / f"fuzz-{index:04d}.dcm",
                            sop_class_uid=mutation.sop_class_uid,
                            sop_instance_uid=mutation.sop_instance_uid,
                            transfer_syntax_uid=mutation.transfer_syntax_uid,
                            dataset_bytes=mutation.dataset_bytes)


# --- malformed but parseable instances --------------------------------------------------------

def _renamed(dataset: Dataset) -> Dataset:
    dataset = copy.deepcopy(dataset)
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def absurd_dimensions(source: Dataset) -> list[tuple[str, Dataset]]:
    """Instances whose header claims sizes the pixel data cannot hold or nobody should decode."""
    cases = []
    for name, rows, columns in (("65535x65535", 65535, 65535), ("rows-0", 0, 512),
                                ("1x65535", 1, 65535)):
        dataset = _renamed(source)
        dataset.Rows, dataset.Columns = rows, columns
        cases.append((f"dimensions-{name}", dataset))
    dataset = _renamed(source)
    dataset.NumberOfFrames = 100000
    cases.append(("frames-100000", dataset))
    dataset = _renamed(source)
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 64, 64, 63
    cases.append(("bits-allocated-64", dataset))
    return cases



def declaring(source: Dataset, rows: int, columns: int) -> Dataset:
    """`source` (any transfer syntax, its pixel data unchanged) under a fresh SOP Instance UID,
    its header declaring `rows` x `columns` pixels: issue 23's JPEG 2000 film "of 60000 x 60000"
    that no decoder here would ever be allowed to decode."""
    dataset = _renamed(source)
    dataset.Rows, dataset.Columns = rows, columns
    return dataset

def wrong_vrs(source: Dataset) -> list[tuple[str, Dataset]]:
    """Instances with elements under a VR the standard does not give them (explicit VR only)."""
    cases = []
    for name, tag, vr, value in (
            ("rows-as-LO", 0x00280010, "LO", "five hundred"),
            ("bits-allocated-as-DS", 0x00280100, "DS", "16.5"),
            ("photometric-as-US", 0x00280004, "US", 2),
            ("study-uid-as-FD", 0x0020000D, "FD", 3.5),
            ("modality-as-SQ", 0x00080060, "SQ", [])):
        dataset = _renamed(source)
        dataset[tag] = DataElement(tag, vr, value)
        cases.append((f"vr-{name}", dataset))
    return cases


DATASET_TRAILING_PADDING = b"\xfc\xff\xfc\xff"  # (FFFC,FFFC), little endian
PIXEL_DATA = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
OVERLAY_DATA = b"\x00\x60\x00\x30"  # (6000,3000), little endian
ZERO_PIECE_BYTES = 16 * 1024 * 1024


def deflate_bomb(source: Dataset, path: Path, *, inflated_bytes: int,
                 bulk: str = "pixels") -> Path:
    """A valid Deflated Explicit VR Little Endian film under a fresh SOP Instance UID whose
    dataset inflates to about `inflated_bytes` (about 1 kB on the wire per MB inflated), built
    compressed, so a 1 GB one costs the test about 1 MB. `source` is an uncompressed film.

    bulk="pixels" (issue 14's): zero pixels, Rows and Columns declaring the size (from about
    100 MB, more pixels than [limits] max_pixels allows). bulk="padding" (issue 23): `source`'s
    own small film followed by Data Set Trailing Padding (FFFC,FFFC) of zeros, within every
    pixel limit: only its inflated size gives it away. bulk="overlay": the zeros as Overlay
    Data (6000,3000) before `source`'s pixels, so they are part of the header.
    """
    dataset = _renamed(source)
    tail = b""  # what follows the zeros
    if bulk == "pixels":
        side = int((inflated_bytes / 2) ** 0.5)
        dataset.Rows, dataset.Columns = side, side
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        del dataset.PixelData
        tag, vr, zeros = PIXEL_DATA, b"OW", side * side * 2
    elif bulk == "padding":
        tag, vr, zeros = DATASET_TRAILING_PADDING, b"OB", inflated_bytes // 2 * 2
    elif bulk == "overlay":
        tag, vr, zeros = OVERLAY_DATA, b"OW", inflated_bytes // 2 * 2
        pixels = Dataset()
        pixels.PixelData = dataset.PixelData
        pixels["PixelData"].VR = "OW"
        tail = _dataset_bytes(pixels, EXPLICIT_VR_LE)
        del dataset.PixelData
    else:
        raise ValueError(f"bulk: 'pixels', 'padding' or 'overlay', not {bulk!r}")
    head = _dataset_bytes(dataset, EXPLICIT_VR_LE) + tag + vr + b"\0\0" + struct.pack("<I", zeros)
    return write_raw_part10(path, sop_class_uid=str(dataset.SOPClassUID),
                            sop_instance_uid=str(dataset.SOPInstanceUID),
                            transfer_syntax_uid=DeflatedExplicitVRLittleEndian,
                            dataset_bytes=_deflated(head, zeros, tail))


def _deflated(head: bytes, zeros: int, tail: bytes = b"") -> bytes:
    """Raw deflate (PS3.5 A.5) of `head`, `zeros` zero bytes and `tail`. Built in pieces that
    each end in a full flush (byte-aligned, nothing after refers back), so pieces concatenate
    and one compressed 16 MiB of zeros serves for all of them."""
    def piece(data: bytes, final: bool = False) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return compressor.compress(data) + compressor.flush(
            zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    whole, rest = divmod(zeros, ZERO_PIECE_BYTES)
    zero_piece = piece(bytes(ZERO_PIECE_BYTES)) if whole else b""
    return piece(head) + zero_piece * whole + piece(bytes(rest) + tail, final=True)


def corrupt_pixel_data(source: Dataset, folder: Path) -> dict[str, Path]:
    """Issue 14, item 3: datasets that were acknowledged and then failed (or were skipped), as
    raw Part 10 files under fresh UIDs, by name. `source` is an uncompressed film; a JPEG-LS
    copy of it supplies the encapsulated cases."""
    def raw(name: str, dataset: Dataset, data: bytes) -> Path:
        return write_raw_part10(folder / f"{name}.dcm", sop_class_uid=str(dataset.SOPClassUID),
                                sop_instance_uid=str(dataset.SOPInstanceUID),
                                transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
                                dataset_bytes=data)

    files = {}
    whole = _renamed(source)
    data = _dataset_bytes(whole, EXPLICIT_VR_LE)
    pixels_at = data.rindex(b"\xe0\x7f\x10\x00")  # the Pixel Data element
    cut = pixels_at + 12 + (len(data) - pixels_at - 12) // 2
    files["cut-mid-pixel-data"] = raw("cut-mid-pixel-data", whole, data[:cut])

    half = _renamed(source)  # consistent element, but half the pixels the header declares
    half.PixelData = source.PixelData[: len(source.PixelData) // 2]
    files["half-the-pixels"] = raw("half-the-pixels", half, _dataset_bytes(half, EXPLICIT_VR_LE))

    overlong = _renamed(source)  # implicit VR: an element before the pixels claims 4 GB
    body = _dataset_bytes(overlong, ImplicitVRLittleEndian)
    name_at = body.index(b"\x10\x00\x10\x00")  # (0010,0010) Patient's Name
    body = body[:name_at + 4] + struct.pack("<I", 0xFFFFFFF0) + body[name_at + 8:]
    overlong.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    files["element-length-0xfffffff0"] = raw("element-length-0xfffffff0", overlong, body)

    compressed = _renamed(source)
    compressed.compress(JPEGLSLossless)
    data = _dataset_bytes(compressed, EXPLICIT_VR_LE)
    files["encapsulated-cut-mid-fragment"] = raw("encapsulated-cut-mid-fragment", compressed,
                                                 data[: len(data) - 100])
    delimiter = _renamed(compressed)
    files["encapsulated-no-delimiter"] = raw("encapsulated-no-delimiter", delimiter,
                                             _dataset_bytes(delimiter, EXPLICIT_VR_LE)[:-8])
    return files


def undecodable(source: Dataset) -> Dataset:
    """`source` (same UIDs) as JPEG-LS whose one fragment is garbage: whole and well formed on
    the wire, so the listener acknowledges it, but no decoder can read it (decode-failed)."""
    from pydicom.encaps import encapsulate

    dataset = copy.deepcopy(source)
    dataset.compress(JPEGLSLossless, generate_instance_uid=False)
    dataset.PixelData = encapsulate([b"\xff\xd8" + bytes(254)])
    return dataset


def save_explicit(dataset: Dataset, path: Path) -> Path:
    """Save as explicit VR little endian Part 10 (keeping the wrong VRs as written)."""
    dataset = copy.deepcopy(dataset)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress()
    dataset.file_meta.TransferSyntaxUID = EXPLICIT_VR_LE
    dataset.save_as(path, enforce_file_format=True)
    return path


# --- sending unparsed data sets ---------------------------------------------------------------

@dataclass
class RawSendResult:
    path: Path
    status: int | None  # None: no response (association aborted or refused)
    error: str = ""


def send_raw_files(host: str, port: int, paths: Sequence[Path], *, called_ae: str,
                   calling_ae: str = "FUZZER", timeout_s: float = 30.0,
                   per_association: int = 50) -> list[RawSendResult]:
    """C-STORE each file's data set bytes unparsed (pynetdicom chunked send); on an abort,
    carry on in a new association. Returns one result per file."""
    from pynetdicom import AE, _config

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    results: list[RawSendResult] = []
    try:
        pending = list(paths)
        while pending:
            ae = AE(ae_title=calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
            metas = {}
            for path in pending[:per_association]:
                metas[path] = read_file_meta_info(path)  # the data set may not parse
            for sop_class, syntax in {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                                      for m in metas.values()}:
                ae.add_requested_context(sop_class, [syntax])
            association = ae.associate(host, port, ae_title=called_ae)
            if not association.is_established:
                results += [RawSendResult(p, None, "association not established")
                            for p in pending]
                return results
            batch = list(metas)
            sent = 0
            for path in batch:
                try:
                    response = association.send_c_store(path)
                    status = int(response.Status) if "Status" in response else None
                    results.append(RawSendResult(path, status))
                except (ValueError, AttributeError, RuntimeError) as error:
                    results.append(RawSendResult(path, None, f"{type(error).__name__}: {error}"))
                sent += 1
                if not association.is_established:
                    break
            if association.is_established:
                association.release()
            pending = pending[sent:]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return results



def send_files_at_once(port: int, paths: Sequence[Path], **modality) -> list:
    """Each file's bytes as they are (SimulatedModality.send_file_as_is), each over its own
    association, all at the same time: several modalities sending together. Returns their
    SendResults in the order of `paths`; `modality` goes to SimulatedModality."""
    from concurrent.futures import ThreadPoolExecutor

    from pynetdicom import _config

    from testbed.dicom_peers import SimulatedModality

    # Set once for all threads: each send's own set-and-restore would race with the others',
    # and a send that is not chunked decodes (inflates) the file in this process first.
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(paths))) as pool:
            return list(pool.map(
                lambda path: SimulatedModality(port, **modality).send_file_as_is(path), paths))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous

# --- raw-socket peers -------------------------------------------------------------------------

def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def associate_rq(*, called_ae: str, calling_ae: str = "RAWPEER",
                 abstract_syntax: str = VERIFICATION,
                 transfer_syntaxes: Sequence[str] = (EXPLICIT_VR_LE, ImplicitVRLittleEndian),
                 max_pdu: int = 16384) -> bytes:
    """A complete A-ASSOCIATE-RQ PDU with one presentation context (id 1)."""
    context = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, _uid(abstract_syntax)) + b"".join(
        _item(0x40, _uid(ts)) for ts in transfer_syntaxes)
    user_info = _item(0x51, struct.pack(">I", max_pdu)) + _item(
        0x52, _uid("1.2.826.0.1.3680043.8.498.1"))
    variable = (_item(0x10, _uid(APPLICATION_CONTEXT)) + _item(0x20, context)
                + _item(0x50, user_info))
    body = (struct.pack(">HH", 1, 0) + called_ae.encode().ljust(16)[:16]
            + calling_ae.encode().ljust(16)[:16] + b"\x00" * 32 + variable)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data_tf(context_id: int, payload: bytes, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU carrying one PDV."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IB", len(payload) + 2, context_id) + bytes([header]) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _echo_command() -> bytes:
    """A C-ECHO-RQ command set, implicit VR little endian."""
    command = Dataset()
    command.AffectedSOPClassUID = VERIFICATION
    command.CommandField = 0x0030
    command.MessageID = 1
    command.CommandDataSetType = 0x0101
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, command)
    body = buffer.getvalue()
    group_length = struct.pack("<HHII", 0x0000, 0x0000, 4, len(body))
    return group_length + body


@contextlib.contextmanager
def raw_connection(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0
                   ) -> Iterator[socket.socket]:
    connection = socket.create_connection((host, port), timeout=timeout_s)
    try:
        yield connection
    finally:
        with contextlib.suppress(OSError):
            connection.close()


def read_pdu(connection: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU; (0, b"") when the peer closed."""
    header = _read_exactly(connection, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBI", header)
    return pdu_type, _read_exactly(connection, length)


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = connection.recv(min(size, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _connect_and_leave(port: int, called_ae: str) -> str:
    with raw_connection(port):
        pass
    return "closed without sending"


def _half_associate_rq(port: int, called_ae: str) -> str:
    request = associate_rq(called_ae=called_ae)
    with raw_connection(port) as connection:
        connection.sendall(request[: len(request) // 2])
    return "sent half an A-ASSOCIATE-RQ, closed"


def _header_only(port: int, called_ae: str) -> str:
    with raw_connection(port) as connection:
        connection.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0))
    return "announced a 4 GiB A-ASSOCIATE-RQ, closed"


def _stall_mid_pdu(port: int, called_ae: str, stall_s: float = 1.0) -> str:
    request = associate_rq(called_ae=called_ae)
    with raw_connection(port) as connection:
        connection.sendall(request[:20])
        time.sleep(stall_s)
    return f"sent 20 bytes, stalled {stall_s} s, closed"


def _garbage(port: int, called_ae: str) -> str:
    with raw_connection(port) as connection:
        connection.sendall(random.Random(7).randbytes(3000))
    return "sent 3000 random bytes, closed"


def _unknown_pdu_type(port: int, called_ae: str) -> str:
    with raw_connection(port) as connection:
        connection.sendall(struct.pack(">BBI", 0x7F, 0, 4) + b"\x00" * 4)
        with contextlib.suppress(OSError):
            read_pdu(connection)
    return "sent PDU type 0x7F"


def _drop_mid_p_data(port: int, called_ae: str) -> str:
    with raw_connection(port) as connection:
        connection.sendall(associate_rq(called_ae=called_ae))
        pdu_type, _ = read_pdu(connection)
        if pdu_type != 0x02:
            return f"association not accepted (PDU type {pdu_type:#04x})"
        pdu = p_data_tf(1, _echo_command(), command=True, last=True)
        connection.sendall(pdu[: len(pdu) - 7])
    return "associated, sent a C-ECHO-RQ P-DATA-TF without its last 7 bytes, closed"


def _drop_after_huge_p_data_header(port: int, called_ae: str) -> str:
    with raw_connection(port) as connection:
        connection.sendall(associate_rq(called_ae=called_ae))
        pdu_type, _ = read_pdu(connection)
        if pdu_type != 0x02:
            return f"association not accepted (PDU type {pdu_type:#04x})"
        connection.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFF00) + b"\x00" * 100)
    return "associated, announced a 4 GiB P-DATA-TF, sent 100 bytes, closed"


def connect_burst(port: int, count: int = 20, host: str = "127.0.0.1") -> None:
    """Issue 14's repro: `for i in $(seq 20); do (exec 3<>/dev/tcp/127.0.0.1/11112); done`,
    a port scan or a TCP health probe: connections opened and closed at once, sending nothing."""
    for _ in range(count):
        with raw_connection(port, host):
            pass


def silent_connections(port: int, count: int, *, source: str = "127.0.0.1",
                       host: str = "127.0.0.1") -> list[socket.socket]:
    """`count` connections from `source` (any 127.x.y.z address works on Linux loopback) that
    stay open and send nothing; the caller closes them."""
    connections = []
    for _ in range(count):
        connection = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
        connections.append(connection)
    return connections


def closed_by_peer(connection: socket.socket, timeout_s: float) -> bool:
    """Whether the other end closes `connection` within `timeout_s` (data it sends is read
    and dropped)."""
    connection.settimeout(timeout_s)
    try:
        while connection.recv(4096):
            pass
    except socket.timeout:
        return False
    except OSError:  # reset
        return True
    return True


# name -> (port, called AE) -> description of what was done
BROKEN_PEERS: dict[str, Callable[[int, str], str]] = {
    "connect-and-leave": _connect_and_leave,
    "half-associate-rq": _half_associate_rq,
    "huge-associate-rq-header": _header_only,
    "stall-mid-associate-rq": _stall_mid_pdu,
    "garbage": _garbage,
    "unknown-pdu-type": _unknown_pdu_type,
    "drop-mid-p-data": _drop_mid_p_data,
    "huge-p-data-header": _drop_after_huge_p_data_header,
}
