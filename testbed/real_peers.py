"""Real DICOM peers for interop and fault tests: Orthanc as the PACS, DCMTK as the modality,
and helpers around `pacs-ai serve` running as a subprocess.

- :class:`Orthanc` starts ``Orthanc`` with a temporary JSON configuration (own DICOM and HTTP
  ports, own storage folder, no plugins, no HTTP authentication, only loopback HTTP access) and
  answers questions through its REST API (stdlib ``urllib``: studies, series, instances, tags).
- :func:`echoscu`, :func:`storescu`, :func:`storescu_many` run DCMTK with a timeout and parse the
  per-file store statuses from its log, so a test can count sent / acknowledged / refused.
- :func:`propose_as_stored` writes a DCMTK association profile that proposes, for every file, its
  own SOP class with only the transfer syntax it is stored in (no fallback to uncompressed).
- The service itself runs through ``testbed.dicom_peers`` (``write_service_config`` and
  ``ServiceProcess``); :func:`thread_count` (``/proc/<pid>/task``) and
  :func:`orthanc_destination` add what real-peer and fault tests need.

Every helper that runs an external program calls ``testbed.environment.require_tool`` first,
so tests using them skip outside CI when the tool is missing and fail in CI; mark them
``@pytest.mark.real_peer``. Every wait is bounded.

Orthanc 1.10 has no option to bind its DICOM port to one address; it listens on all interfaces on
a free port, and only answers C-STORE from modalities registered at 127.0.0.1
(``DicomAlwaysAllowStore`` false with ``DicomCheckModalityHost``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.dicom_peers import free_port
from testbed.environment import require_tool

LOOPBACK = "127.0.0.1"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # orthanc-dicomweb
TOOL_TIMEOUT_S = 120
START_TIMEOUT_S = 60


# --- small utilities --------------------------------------------------------------------------

def require_file(path: Path, package: str) -> str:
    """A file a Debian package installs, or skip/fail like require_tool."""
    from testbed.environment import skip_or_fail

    if not Path(path).is_file():
        skip_or_fail(f"{path} not found (apt-get install {package})")
    return str(path)


def wait_for_port(port: int, *, host: str = LOOPBACK, timeout_s: float = START_TIMEOUT_S,
                  process: subprocess.Popen | None = None, what: str = "server") -> None:
    """Return once a TCP connect to host:port succeeds; raise if the process dies or time runs
    out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before "
                               f"listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout_s} s")


def stop_process(process: subprocess.Popen, *, timeout_s: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    return process.returncode


# --- Orthanc ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc knows: its AE title, address and port (and whether it speaks TLS)."""

    ae_title: str
    port: int
    host: str = LOOPBACK
    tls: bool = False

    def orthanc_entry(self) -> dict[str, Any]:
        return {"AET": self.ae_title, "Host": self.host, "Port": self.port,
                "UseDicomTls": self.tls}


@dataclass(frozen=True)
class OrthancTLS:
    """DICOM TLS for Orthanc's SCP (and its SCU): its own certificate and key, and the
    certificates it trusts from peers (a CA file works)."""

    cert_file: Path
    key_file: Path
    trusted_file: Path
    require_peer_cert: bool = True


class Orthanc:
    """One Orthanc process with a private configuration and storage folder.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``modalities`` are the peers
    allowed to store (our service's AE at its address); stores from others are refused.
    """

    def __init__(self, folder: Path, *, ae_title: str = "ORTHANC",
                 modalities: Iterable[Modality] = (), tls: OrthancTLS | None = None,
                 dicom_port: int | None = None, http_port: int | None = None,
                 dicomweb: bool = False, users: dict[str, str] | None = None):
        self.dicomweb = dicomweb  # load the DICOMweb plugin (Debian orthanc-dicomweb)
        self.users = dict(users or {})  # HTTP basic users; none: no HTTP authentication
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.modalities = tuple(modalities)
        self.tls = tls
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.folder / "orthanc.log"
        self.config_path = self.folder / "orthanc.json"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS at {dicomweb_url}/studies)."""
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        storage = self.folder / "storage"
        config: dict[str, Any] = {
            "Name": f"pacs-ai-test-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [],
            "LuaScripts": [],
            "ConcurrentJobs": 1,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 4,
            "RemoteAccessAllowed": False,  # HTTP from loopback only
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomThreadsCount": 4,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,  # only the registered modalities ...
            "DicomCheckModalityHost": True,  # ... from their registered address
            "DicomModalities": {f"m{i}": m.orthanc_entry()
                                for i, m in enumerate(self.modalities)},
            "DicomModalitiesInDatabase": False,
            "StableAge": 1,
            "SaveJobs": False,
            "StorageCompression": False,
        }
        if self.dicomweb:
            config["Plugins"] = [require_file(DICOMWEB_PLUGIN, "orthanc-dicomweb")]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.users:
            config.update({"AuthenticationEnabled": True, "RegisteredUsers": self.users})
        if self.tls is not None:
            config.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls.cert_file),
                "DicomTlsPrivateKey": str(self.tls.key_file),
                "DicomTlsTrustedCertificates": str(self.tls.trusted_file),
                "DicomTlsRemoteCertificateRequired": self.tls.require_peer_cert,
            })
        return config

    def start(self) -> "Orthanc":
        binary = require_tool("Orthanc")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "--no-jobs", str(self.config_path)], cwd=self.folder,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self.process.returncode}; "
                                   f"log:\n{self.log_tail()}")
            try:
                self.get("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Orthanc's REST API did not answer within "
                                       f"{START_TIMEOUT_S} s; log:\n{self.log_tail()}")
                time.sleep(0.2)
        wait_for_port(self.dicom_port, process=self.process, what="Orthanc DICOM")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL: the PACS disappears at once (for "PACS down" faults)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=20)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # REST ---------------------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        if not self.users:
            return {}
        import base64

        user, password = next(iter(self.users.items()))
        return {"Authorization": "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode()}

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  **self._auth_headers()})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def get_bytes(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, headers=self._auth_headers())
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def instance_ids(self) -> list[str]:
        return self.get("/instances")

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def instance_tags(self, orthanc_id: str) -> dict[str, str]:
        """The tags of one stored instance by keyword (SOPInstanceUID, StudyInstanceUID, ...)."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def instances(self) -> list[dict[str, str]]:
        """The simplified tags of every stored instance."""
        return [self.instance_tags(i) for i in self.instance_ids()]

    def instances_of_class(self, sop_class_uid: str) -> list[dict[str, str]]:
        return [tags for tags in self.instances() if tags.get("SOPClassUID") == sop_class_uid]

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        request = urllib.request.Request(self.url + "/tools/lookup",
                                         data=sop_instance_uid.encode(), method="POST",
                                         headers=self._auth_headers())
        with urllib.request.urlopen(request, timeout=30) as response:
            hits = json.loads(response.read() or b"[]")
        for hit in hits:
            if hit.get("Type") == "Instance":
                return hit["ID"]
        return None

    def study_instances(self, study_instance_uid: str) -> list[dict[str, str]]:
        """Simplified tags of every instance of the study with this Study Instance UID."""
        hits = self.post("/tools/find", {"Level": "Instance", "Expand": False,
                                         "Query": {"StudyInstanceUID": study_instance_uid}})
        return [self.instance_tags(i) for i in hits]

    def study_sop_instance_uids(self, study_instance_uid: str, *,
                                modality: str | None = None) -> list[str]:
        """SOP Instance UIDs stored in a study (of one modality, e.g. "SR"), one REST call;
        a UID stored twice would appear twice."""
        query = {"StudyInstanceUID": study_instance_uid}
        if modality is not None:
            query["Modality"] = modality
        hits = self.post("/tools/find", {"Level": "Instance", "Expand": True, "Query": query})
        return [hit["MainDicomTags"]["SOPInstanceUID"] for hit in hits]

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored Part 10 file, byte for byte as received."""
        return self.get_bytes(f"/instances/{orthanc_id}/file")

    def delete_everything(self) -> None:
        for patient in self.get("/patients"):
            self._request("DELETE", f"/patients/{patient}")


# --- DCMTK as the modality --------------------------------------------------------------------

# DCMTK logs one of these per C-STORE response (storescu -v):
#   "I: Received Store Response (Success)"
#   "I: Received Store Response (Warning: ...)", "(Out of Resources ...)", "(... Error ...)"
_STORE_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")
_SENDING_FILE = re.compile(r"Sending file: (.+)$")


@dataclass
class StoreRun:
    """One storescu run: exit status, output, and per file its response status (None: no
    response came back, e.g. the association was refused or aborted)."""

    argv: list[str]
    returncode: int
    output: str
    responses: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[str]:
        """Files whose C-STORE got a Success (or Warning, which also means stored) status."""
        return [path for path, status in self.responses
                if status is not None and (status.startswith("Success")
                                           or status.startswith("Warning"))]

    @property
    def refused(self) -> list[tuple[str, str]]:
        return [(path, status) for path, status in self.responses
                if status is not None and not (status.startswith("Success")
                                               or status.startswith("Warning"))]


def _parse_store_log(output: str) -> list[tuple[str, str | None]]:
    """Pair each "Sending file" line with the next store response (or None)."""
    responses: list[tuple[str, str | None]] = []
    current: str | None = None
    for line in output.splitlines():
        if (sending := _SENDING_FILE.search(line)) is not None:
            if current is not None:
                responses.append((current, None))
            current = sending.group(1).strip()
        elif (response := _STORE_RESPONSE.search(line)) is not None and current is not None:
            responses.append((current, (response.group(1) or "Success").strip()))
            current = None
    if current is not None:
        responses.append((current, None))
    return responses


def echoscu(port: int, *, called_ae: str, calling_ae: str = "ECHOSCU", host: str = LOOPBACK,
            extra: Sequence[str] = (), timeout_s: float = TOOL_TIMEOUT_S
            ) -> subprocess.CompletedProcess[str]:
    tool = require_tool("echoscu")
    return subprocess.run([tool, "-v", "-aet", calling_ae, "-aec", called_ae, "-to", "10",
                           "-ta", "10", *extra, host, str(port)],
                          capture_output=True, text=True, errors="replace",
                          timeout=timeout_s, check=False)


def storescu(port: int, paths: Sequence[str | Path], *, called_ae: str,
             calling_ae: str = "STORESCU", host: str = LOOPBACK, extra: Sequence[str] = (),
             timeout_s: float = TOOL_TIMEOUT_S) -> StoreRun:
    """Send files (or folders, scanned recursively) in one association with ``storescu -v``.

    ``-nh`` keeps going after a refused file so every file gets its own status; pass options
    such as ``-xs`` or ``-xf <cfg> <profile>`` in ``extra``.
    """
    tool = require_tool("storescu")
    argv = [tool, "-v", "-nh", "-aet", calling_ae, "-aec", called_ae, "-to", "10", "-ta", "10",
            "-td", "60", *extra]
    if any(Path(p).is_dir() for p in paths):
        argv += ["+sd", "+r"]
    argv += [host, str(port), *map(str, paths)]
    completed = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                               timeout=timeout_s, check=False)
    output = completed.stdout + completed.stderr
    return StoreRun(argv=argv, returncode=completed.returncode, output=output,
                    responses=_parse_store_log(output))


def storescu_many(port: int, batches: Sequence[Sequence[str | Path]], *, called_ae: str,
                  calling_ae: str = "STORESCU", extra: Sequence[str] = (),
                  timeout_s: float = TOOL_TIMEOUT_S) -> list[StoreRun]:
    """One storescu process (one association) per batch, all at the same time."""
    with ThreadPoolExecutor(max_workers=max(1, len(batches))) as pool:
        futures = [pool.submit(storescu, port, batch, called_ae=called_ae,
                               calling_ae=calling_ae, extra=extra, timeout_s=timeout_s)
                   for batch in batches]
        return [future.result() for future in futures]


def propose_as_stored(files: Sequence[Path], config_path: Path,
                      profile: str = "AsStored") -> list[str]:
    """Write a DCMTK association profile proposing, for each (SOP class, transfer syntax) pair
    of the files, exactly that pair, and return the ``-xf`` options that select it.

    storescu then offers every file only in the syntax it is stored in: a peer that cannot take
    that syntax must reject the context, and storescu cannot fall back to converting.
    """
    import pydicom

    pairs: dict[tuple[str, str], None] = {}
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        pairs[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    syntaxes = sorted({syntax for _, syntax in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for index, syntax in enumerate(syntaxes):
        lines += [f"[TS{index}]", f"TransferSyntax1 = {syntax}"]
    lines += ["[[PresentationContexts]]", f"[{profile}Contexts]"]
    for number, (sop_class, syntax) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{number} = {sop_class}\\TS{syntaxes.index(syntax)}")
    lines += ["[[Profiles]]", f"[{profile}]", f"PresentationContexts = {profile}Contexts", ""]
    config_path.write_text("\n".join(lines))
    return ["-xf", str(config_path), profile]


# --- pacs-ai serve as a subprocess ------------------------------------------------------------
# The service runs through testbed.dicom_peers (write_service_config + ServiceProcess); these add
# what real-peer and fault tests need on top.

def thread_count(pid: int) -> int:
    """Threads of a process right now (entries of /proc/<pid>/task)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def status_kb(pid: int, key: str) -> int:
    """A kB figure of /proc/<pid>/status: "VmRSS" (resident now), "VmHWM" (the peak of it);
    0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM again from the resident size now (Linux clear_refs "5"; the process must be
    ours), so a later VmHWM is the peak of what happened in between."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def orthanc_destination(orthanc: "Orthanc", **extra: Any) -> dict[str, Any]:
    """Orthanc as a [[destinations]] entry of the service's config."""
    return {"name": "orthanc", "ae_title": orthanc.ae_title, "host": LOOPBACK,
            "port": orthanc.dicom_port, **extra}


# --- what the service recorded ----------------------------------------------------------------

@dataclass(frozen=True)
class JobRow:
    sop_instance_uid: str
    state: str
    reason: str | None
    report_uid: str | None
    image_file: str


def spool_jobs(spool_dir: Path) -> dict[str, JobRow]:
    """The service's jobs by SOP Instance UID, read through a read-only SQLite connection
    (safe while the service runs: the queue is in WAL mode)."""
    import sqlite3

    path = Path(spool_dir) / "jobs.sqlite"
    if not path.is_file():
        return {}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = connection.execute(
            "SELECT sop_instance_uid, state, reason, report_uid, image_file FROM jobs").fetchall()
    finally:
        connection.close()
    return {row[0]: JobRow(*row) for row in rows}


def renamed_copy(source: Path, target: Path, *, study_instance_uid: str | None = None) -> Path:
    """A copy of a DICOM file under fresh SOP Instance, Series and Study Instance UIDs (the
    study's can be given), pixel data and transfer syntax untouched: the same image as a new
    instance, so a service that has seen the original treats it as new."""
    import pydicom
    from pydicom.uid import generate_uid

    dataset = pydicom.dcmread(source)
    dataset.SOPInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.StudyInstanceUID = study_instance_uid or generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(target, enforce_file_format=True)
    return target
