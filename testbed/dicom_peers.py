"""Reusable DICOM peers for tests: a simulated modality, a PACS that records what it receives,
synthetic radiographs, and a `pacs-ai serve` running as a real subprocess.

Everything binds to 127.0.0.1 on free ports and every wait is bounded.

    with RecordingPacs() as pacs:                       # the destination PACS (a pynetdicom SCP)
        config = write_service_config(tmp_path, model=model_path,
                                      destinations=[pacs.destination()])
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            modality = SimulatedModality(service.port)
            results = modality.send([synthetic_radiograph(), "file.dcm"])
            assert pacs.wait_for(1)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import Verification

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --- synthetic images ---------------------------------------------------------------------------

def synthetic_radiograph(*, sop_class_uid: str = CR_IMAGE_STORAGE, modality: str | None = None,
                         body_part: str | None = "CHEST", view_position: str | None = "PA",
                         rows: int = 96, columns: int = 80, seed: int = 0,
                         study_instance_uid: str | None = None,
                         sop_instance_uid: str | None = None,
                         photometric: str = "MONOCHROME2",
                         transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """A small, valid CR/DX image with patient/study attributes and 12-bit noise-and-gradient
    pixels (distinct per `seed`, so a model gives distinct probabilities)."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 3000, columns)[np.newaxis, :] + np.linspace(0, 800, rows)[:, np.newaxis]
    pixels = (gradient + rng.normal(0, 150, (rows, columns))).clip(0, 4095).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = f"SYN{seed:05d}"
    ds.PatientBirthDate = "20150101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{seed:05d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = seed % 1000 + 1
    ds.Modality = modality or ("CR" if sop_class_uid == CR_IMAGE_STORAGE else "DX")
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    if sop_class_uid != CR_IMAGE_STORAGE:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = ("FOR PRESENTATION"
                                     if sop_class_uid == DX_FOR_PRESENTATION_STORAGE
                                     else "FOR PROCESSING")
        ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        if UID(transfer_syntax).is_compressed:
            ds.compress(transfer_syntax)
        else:
            ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
            if not UID(transfer_syntax).is_little_endian:  # OW bytes are in the syntax's order
                ds.PixelData = pixels.astype(">u2").tobytes()
    return ds


def load(item: Dataset | str | Path) -> Dataset:
    return item if isinstance(item, Dataset) else dcmread(item)


# --- the simulated modality (an SCU) --------------------------------------------------------------

@dataclass(frozen=True)
class SendResult:
    sop_instance_uid: str
    status: int | None  # None: no answer (association lost or never established)
    error_comment: str | None = None

    @property
    def acknowledged(self) -> bool:
        return self.status == 0x0000


class SimulatedModality:
    """A `storescu` in Python: sends instances over one association, reports each status."""

    def __init__(self, port: int, *, host: str = LOCALHOST, called_ae_title: str = "PACS_AI",
                 calling_ae_title: str = "MODALITY", timeout: float = 20.0,
                 ssl_context: Any = None):
        self.host, self.port = host, port
        self.called_ae_title, self.calling_ae_title = called_ae_title, calling_ae_title
        self.timeout = timeout
        self.ssl_context = ssl_context

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        return ae

    def _associate(self, ae: AE):
        tls_args = (self.ssl_context, None) if self.ssl_context is not None else None
        return ae.associate(self.host, self.port, ae_title=self.called_ae_title,
                            tls_args=tls_args)

    def echo(self) -> int | None:
        ae = self._ae()
        ae.add_requested_context(Verification)
        association = self._associate(ae)
        if not association.is_established:
            return None
        try:
            status = association.send_c_echo()
            return int(status.Status) if "Status" in status else None
        finally:
            association.release()

    def association_accepted(self) -> bool:
        """Whether the listener accepts an association from our calling AE title."""
        ae = self._ae()
        ae.add_requested_context(Verification)
        association = self._associate(ae)
        accepted = association.is_established
        if accepted:
            association.release()
        return accepted

    def send(self, items: Iterable[Dataset | str | Path], stop_after: int | None = None,
             interval: float = 0.0) -> list[SendResult]:
        """C-STORE each dataset or file over one association, in order, `interval` seconds
        apart (to stretch a stream over time).

        Proposes one presentation context per (SOP class, transfer syntax) in the input.
        Once the association is lost, the remaining instances get status None.
        """
        datasets = [load(item) for item in items]
        if not datasets:
            return []
        ae = self._ae()
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                    for ds in datasets}
        for sop_class, syntax in sorted(contexts):
            ae.add_requested_context(sop_class, [syntax])
        association = self._associate(ae)
        if not association.is_established:
            return [SendResult(str(ds.SOPInstanceUID), None, "association not established")
                    for ds in datasets]
        results: list[SendResult] = []
        try:
            for index, ds in enumerate(datasets):
                if stop_after is not None and index >= stop_after:
                    break
                if index and interval:
                    time.sleep(interval)
                try:
                    status = association.send_c_store(ds)
                except RuntimeError:  # the association ended (the peer stopped or crashed)
                    results.append(SendResult(str(ds.SOPInstanceUID), None, "association lost"))
                    continue
                if "Status" in status:
                    results.append(SendResult(str(ds.SOPInstanceUID), int(status.Status),
                                              status.get("ErrorComment")))
                else:
                    results.append(SendResult(str(ds.SOPInstanceUID), None, "no answer"))
        finally:
            if association.is_established:
                association.release()
        return results

    def send_file_as_is(self, path: str | Path) -> SendResult:
        """C-STORE a file's bytes exactly as they are (no decoding, no re-encoding), the way a
        modality with a corrupt dataset would: for testing the listener's refusals."""
        from pydicom.filereader import read_file_meta_info
        from pynetdicom import _config

        meta = read_file_meta_info(path)
        ae = self._ae()
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        association = self._associate(ae)
        if not association.is_established:
            return SendResult(str(meta.MediaStorageSOPInstanceUID), None, "not established")
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = association.send_c_store(Path(path))
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
            if association.is_established:
                association.release()
        return SendResult(str(meta.MediaStorageSOPInstanceUID),
                          int(status.Status) if "Status" in status else None,
                          status.get("ErrorComment"))


# --- the PACS that receives the reports (an SCP) ---------------------------------------------------

class RecordingPacs:
    """A storage SCP that keeps every dataset it receives (and can be stopped and started again
    on the same port, to play a destination that goes down and comes back)."""

    def __init__(self, *, port: int | None = None, ae_title: str = "PACS",
                 answer_status: int = 0x0000, store_dir: Path | None = None,
                 transfer_syntaxes: list[str] | None = None):
        self.port = port or free_port()
        self.transfer_syntaxes = transfer_syntaxes  # None: pynetdicom's default list
        self.ae_title = ae_title
        self.answer_status = answer_status
        self.store_dir = store_dir
        self.received: list[Dataset] = []
        self.calling_ae_titles: list[str] = []
        self._lock = threading.Lock()
        self._server = None

    def destination(self, **extra: Any) -> dict[str, Any]:
        """This PACS as a [[destinations]] entry."""
        return {"ae_title": self.ae_title, "host": LOCALHOST, "port": self.port, **extra}

    def start(self) -> "RecordingPacs":
        ae = AE(ae_title=self.ae_title)
        if self.transfer_syntaxes is None:
            ae.supported_contexts = StoragePresentationContexts
        else:
            ae.supported_contexts = [build_context(context.abstract_syntax, self.transfer_syntaxes)
                                     for context in StoragePresentationContexts]
        ae.add_supported_context(Verification)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 20
        self._server = ae.start_server((LOCALHOST, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            for association in self._server.active_associations:
                association.abort()
            self._server = None

    def __enter__(self) -> "RecordingPacs":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _on_store(self, event) -> int:
        if self.answer_status != 0x0000:
            return self.answer_status
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
            self.calling_ae_titles.append(event.assoc.requestor.ae_title)
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            ds.save_as(self.store_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    def snapshot(self) -> list[Dataset]:
        with self._lock:
            return list(self.received)

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until at least `count` datasets have arrived."""
        return wait_until(lambda: len(self.snapshot()) >= count, timeout)


# --- `pacs-ai serve` as a subprocess ---------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def take_any_caller_unless_named(listener: dict[str, Any]) -> None:
    """A test's [listener] takes any calling AE title, as stated (a config file refuses every
    caller until it names them), unless the test names them or says otherwise itself."""
    if "allowed_calling_ae_titles" not in listener:
        listener.setdefault("accept_any_calling_ae", True)


def write_service_config(folder: Path, *, model: Path, port: int | None = None,
                         destinations: Sequence[dict[str, Any]] = (),
                         tables: dict[str, dict[str, Any]] | None = None) -> Path:
    """A config for a test service: 127.0.0.1, a free port, any calling AE title (unless
    `tables` names them), spool in `folder`/spool, no floor, no metrics server, JSON logs at
    debug level, short retry delays. `tables` overrides or adds keys per table, e.g.
    {"retry": {"max_attempts": 3}}."""
    settings: dict[str, dict[str, Any]] = {
        "listener": {"host": LOCALHOST, "port": port or free_port()},
        "limits": {"shutdown_grace_seconds": 5},
        "storage": {"spool_dir": str(folder / "spool"), "min_free_bytes": 0,
                    "keep_source_images": True, "keep_reports": True},
        "model": {"path": str(model)},
        "retry": {"initial_delay_seconds": 0.2, "max_delay_seconds": 1.0, "max_attempts": 50},
        "log": {"level": "debug", "format": "json"},
        "metrics": {"enabled": False},
    }
    for table, values in (tables or {}).items():
        settings.setdefault(table, {}).update(values)
    take_any_caller_unless_named(settings["listener"])
    lines = []
    for table, values in settings.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    for destination in destinations:
        lines.append("[[destinations]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in destination.items()]
        lines.append("")
    path = folder / "pacs-ai.toml"
    path.write_text("\n".join(lines))
    return path


def config_port(config_path: Path) -> int:
    import tomllib

    return int(tomllib.loads(config_path.read_text())["listener"]["port"])


class ServiceProcess:
    """`python -m pacs_ai serve --config PATH` in a subprocess; stderr (JSON logs) to a file."""

    def __init__(self, config_path: Path, log_path: Path, *, env: dict[str, str] | None = None,
                 ready_timeout: float = 90.0):
        self.config_path = Path(config_path)
        self.log_path = Path(log_path)
        self.port = config_port(self.config_path)
        self.env = env
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        environment = {**os.environ, **(self.env or {})}
        environment.setdefault("PYTHONUNBUFFERED", "1")
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_ai", "serve", "--config", str(self.config_path)],
                cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
        modality = SimulatedModality(self.port, timeout=5)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pacs-ai serve exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-4000:]}")
            if port_open(self.port) and modality.echo() == 0x0000:
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"pacs-ai serve not ready after {self.ready_timeout} s:\n"
                           f"{self.log_path.read_text()[-4000:]}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful stop. Returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: the crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events written so far (non-JSON lines are skipped)."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def pacs_ai_cli(*args: str, timeout: float = 120.0,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pacs_ai ARGS...` and capture its output; `env` adds variables."""
    return subprocess.run([sys.executable, "-m", "pacs_ai", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)
