"""Throughput, latency and cost of pacs-ai next to two bare DICOM receivers (issue 7).

One run on this machine sends the same set of files with DCMTK ``storescu`` to

  (a) DCMTK ``storescp`` writing to disk,
  (b) a bare pynetdicom storage SCP writing to disk (a thread in this process),
  (c) ``pacs-ai serve`` (a subprocess, the shipped model) with a recording PACS behind it,

at 1, 2, 4... concurrent associations (the file list split across parallel storescu processes),
and prints images/s received; for pacs-ai also images/s fully reported and the latency from the
C-STORE acknowledgement (the service's ``instance_received`` log event) to the report stored at
the PACS (median, p95, max). Micro-figures: decode + preprocessing per transfer syntax, model
time per image at batch 1 and the service's batch size, and the service's peak RSS.

    .venv/bin/python bench/run_bench.py [--images N] [--concurrency 1,2,4] [--json out.json]

Timings are figures to read, never pass/fail checks.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pynetdicom import AE, StoragePresentationContexts, evt  # noqa: E402
from pynetdicom.presentation import build_context  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402

from testbed.dicom_peers import (DX_FOR_PRESENTATION_STORAGE, LOCALHOST,  # noqa: E402
                                 RecordingPacs, ServiceProcess, free_port, synthetic_radiograph,
                                 wait_until, write_service_config)
from testbed.real_peers import (propose_as_stored, status_kb, stop_process,  # noqa: E402
                                storescu_many, wait_for_port)

SAMPLE_DIR = REPO_ROOT / "sample_dicoms"
MODEL_PATH = REPO_ROOT / "deploy" / "models" / "pacs-ai-pneumonia.pt"
CACHE_DIR = REPO_ROOT / "runs" / "bench-cache"  # runs/ is git-ignored
SYNTHETIC_ROWS, SYNTHETIC_COLUMNS = 2500, 2048
CALLED_AE = {"storescp": "STORESCP", "pynetdicom": "BARE_SCP", "pacs-ai": "PACS_AI"}


# --- the image set ------------------------------------------------------------------------------

def synthetic_files(count: int) -> list[Path]:
    """`count` 2500x2048 12-bit DX files (about 10 MB each), made once and cached."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = CACHE_DIR / f"dx_{SYNTHETIC_ROWS}x{SYNTHETIC_COLUMNS}_{index:04d}.dcm"
        if not path.exists():
            dataset = synthetic_radiograph(sop_class_uid=DX_FOR_PRESENTATION_STORAGE,
                                           rows=SYNTHETIC_ROWS, columns=SYNTHETIC_COLUMNS,
                                           seed=index)
            partial = path.with_suffix(".part")
            dataset.save_as(partial, enforce_file_format=True)
            partial.rename(path)  # a killed run leaves no half-written cache entry
        paths.append(path)
    return paths


def sample_files(limit: int | None) -> list[Path]:
    """The sample_dicoms files the manifest expects to be classified (status ok)."""
    manifest = json.loads((SAMPLE_DIR / "manifest.json").read_text())
    paths = [SAMPLE_DIR / entry["file"] for entry in manifest["files"]
             if entry["expected_status"] == "ok"]
    return paths if limit is None else paths[:limit]


def split(paths: list[Path], parts: int) -> list[list[Path]]:
    """Round-robin split, so each association gets a similar mix of big and small files."""
    return [batch for batch in (paths[index::parts] for index in range(parts)) if batch]


# --- the receivers --------------------------------------------------------------------------------

class BareStorageScp:
    """A plain pynetdicom storage SCP that writes each instance's bytes to disk, as received."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self._server = None

    def start(self) -> "BareStorageScp":
        from pydicom.uid import AllTransferSyntaxes

        ae = AE(ae_title=CALLED_AE["pynetdicom"])
        ae.supported_contexts = [build_context(context.abstract_syntax, AllTransferSyntaxes)
                                 for context in StoragePresentationContexts]
        ae.add_supported_context(Verification)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        ae.maximum_associations = 16
        self._server = ae.start_server((LOCALHOST, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def _on_store(self, event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        (self.folder / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


class TimedPacs(RecordingPacs):
    """The recording PACS, noting when each report (an SR, by its SOP Instance UID) arrived;
    other objects the service sends with a report (a heat-map image) are counted apart."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.arrived_at: dict[str, float] = {}
        self.other_objects = 0

    def _on_store(self, event) -> int:
        arrived = time.time()
        status = super()._on_store(event)
        if str(event.request.AffectedSOPClassUID).startswith(SR_SOP_CLASS_PREFIX):
            self.arrived_at[str(event.request.AffectedSOPInstanceUID)] = arrived
        else:
            self.other_objects += 1
        return status

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until at least `count` reports have arrived."""
        return wait_until(lambda: len(self.arrived_at) >= count, timeout)


# --- one run: a receiver, a concurrency level ------------------------------------------------------

@dataclass
class RunResult:
    receiver: str
    associations: int
    sent: int
    acknowledged: int
    seconds_to_last_ack: float
    images_per_second_received: float
    reported: int | None = None
    seconds_to_last_report: float | None = None
    images_per_second_reported: float | None = None
    latency_seconds: dict[str, float] | None = None  # ack -> report stored at the PACS
    service_peak_rss_mb: float | None = None  # main process + helpers
    service: dict[str, float] | None = None  # service_figures()
    # CPU per acknowledged film while films were sent and reported: the bare SCP's (this
    # process, storescu excluded) or the service's (main + helpers, start-up excluded)
    cpu_ms_per_film: float | None = None
    workers: dict[str, Any] | None = None  # the service's workers_sized event: what it chose
    shadow: dict[str, int] | None = None  # [shadow] runs: its results by status (assessed, busy)
    cpu_seconds: dict[str, float] | None = None  # this process / reaped children, during the run
    notes: list[str] = field(default_factory=list)


def send(port: int, receiver: str, paths: list[Path], associations: int, work: Path,
         timeout_s: float) -> tuple[int, float]:
    """storescu in `associations` parallel processes; (acknowledged count, seconds)."""
    profile = propose_as_stored(paths, work / "as-stored.cfg")  # compressed stays compressed
    started = time.monotonic()
    runs = storescu_many(port, split(paths, associations), called_ae=CALLED_AE[receiver],
                         extra=profile, timeout_s=timeout_s)
    seconds = time.monotonic() - started
    return sum(len(run.acknowledged) for run in runs), seconds


def run_storescp(paths: list[Path], associations: int, work: Path, timeout_s: float) -> RunResult:
    """storescp accepting every syntax it knows (+xa), writing the bytes as received (+B, as the
    bare pynetdicom SCP does), one child per association (--fork, as pynetdicom's threads)."""
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen([shutil.which("storescp") or "storescp", "-aet",
                                CALLED_AE["storescp"], "+xa", "+B", "--fork", "-od", str(out),
                                str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=process, what="storescp")
        acknowledged, seconds = send(port, "storescp", paths, associations, work, timeout_s)
    finally:
        stop_process(process)
    return RunResult("storescp", associations, len(paths), acknowledged, round(seconds, 3),
                     round(acknowledged / seconds, 2))


def run_pynetdicom(paths: list[Path], associations: int, work: Path,
                   timeout_s: float) -> RunResult:
    out = work / "pynetdicom-out"
    out.mkdir()
    scp = BareStorageScp(out).start()
    try:
        acknowledged, seconds = send(scp.port, "pynetdicom", paths, associations, work, timeout_s)
    finally:
        scp.stop()
    return RunResult("pynetdicom", associations, len(paths), acknowledged, round(seconds, 3),
                     round(acknowledged / seconds, 2))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"median": round(statistics.median(ordered), 3), "p95": round(p95, 3),
            "max": round(ordered[-1], 3), "count": len(ordered)}


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the service and its helper processes)."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        index += 1
    return pids


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def service_figures(pid: int) -> dict[str, float]:
    """Peak RSS (VmHWM) and CPU seconds of the service's main process and of its helpers, read
    while they are alive. The total RSS adds the peaks: an upper bound of the peak of the sum."""
    main, *helpers = process_tree(pid)
    main_mb = status_kb(main, "VmHWM") / 1024
    helpers_mb = sum(status_kb(child, "VmHWM") for child in helpers) / 1024
    return {"peak_rss_mb_main": round(main_mb, 1), "peak_rss_mb_helpers": round(helpers_mb, 1),
            "peak_rss_mb_total": round(main_mb + helpers_mb, 1),
            "cpu_seconds_main": round(_cpu_seconds(main), 2),
            "cpu_seconds_helpers": round(sum(_cpu_seconds(child) for child in helpers), 2)}


def cpu_now() -> tuple[float, float]:
    """CPU seconds so far of this process (the bench: bare SCP, recording PACS) and of its
    reaped children (storescu, storescp, the service once stopped)."""
    times = os.times()
    return times.user + times.system, times.children_user + times.children_system


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


@functools.cache
def model_binding() -> dict[str, str]:
    """The [model] keys binding the site thresholds set below to MODEL_PATH."""
    from pacs_ai.model.model import PneumoniaModel
    from pacs_ai.model.site_threshold import binding_keys

    return binding_keys(PneumoniaModel.load(MODEL_PATH))


def run_pacs_ai(paths: list[Path], associations: int, work: Path, timeout_s: float,
                report_timeout_s: float,
                settings: dict[str, dict[str, Any]] | None = None,
                paced: bool = False) -> RunResult:
    """A fresh service (fresh spool) per run, so no instance is a duplicate of an earlier run.
    `settings` ({table: {key: value}}) override the service's config, e.g. workers.count.
    `paced`: an idle service's latency, each image sent alone after the last one's report
    arrived (images/s are then per second of sending, not a throughput)."""
    tables: dict[str, dict[str, Any]] = {
        "listener": {"ae_title": CALLED_AE["pacs-ai"]}, "log": {"level": "info"},
        "storage": {"keep_source_images": False, "keep_reports": False},
        # every film takes the full path to a report: the synthetic films are neither chest
        # films (the model would abstain) nor, by their dates, children (age check); 1.0, the
        # gate's never-abstain, is bound to the file it is for (pacs_ai.model.site_threshold)
        "model": {"min_age_years": 0, "max_age_years": 150, "ood_threshold": 1.0,
                  **model_binding()}}
    for table, values in (settings or {}).items():
        tables.setdefault(table, {}).update(values)
    with TimedPacs() as pacs:
        config = write_service_config(work, model=MODEL_PATH, destinations=[pacs.destination()],
                                      tables=tables)
        with ServiceProcess(config, work / "serve.log") as service:
            at_start = service_figures(service.process.pid)  # start-up's CPU, left out below
            started_wall = time.time()
            if paced:  # one image per association, the next once its report is at the PACS
                acknowledged, seconds = 0, 0.0
                for path in paths:
                    sent_ok, sent_seconds = send(service.port, "pacs-ai", [path], 1, work,
                                                 timeout_s)
                    acknowledged, seconds = acknowledged + sent_ok, seconds + sent_seconds
                    all_reported = pacs.wait_for(acknowledged, timeout=report_timeout_s)
            else:
                acknowledged, seconds = send(service.port, "pacs-ai", paths, associations, work,
                                             timeout_s)
                all_reported = pacs.wait_for(acknowledged, timeout=report_timeout_s)
            shadow_done_after = None
            if "shadow" in tables:  # its CPU counts once it has assessed every film
                queue = work / "spool" / "jobs.sqlite"
                wait_until(lambda: sum(shadow_statuses(queue).values()) >= acknowledged,
                           report_timeout_s)
                shadow_done_after = round(time.time() - started_wall, 3)
            figures = service_figures(service.process.pid)
            events = service.events()
    received_at = {event["sop_instance_uid"]: event_time(event) for event in events
                   if event.get("event") == "instance_received"}
    report_source = {event["report_uid"]: event["sop_instance_uid"] for event in events
                     if event.get("event") == "report_delivered"}
    latencies = [pacs.arrived_at[report_uid] - received_at[source]
                 for report_uid, source in report_source.items()
                 if report_uid in pacs.arrived_at and source in received_at]
    reported = len(pacs.arrived_at)
    last_report = max(pacs.arrived_at.values(), default=started_wall) - started_wall
    for part in ("main", "helpers"):
        figures[f"cpu_seconds_during_run_{part}"] = round(
            figures[f"cpu_seconds_{part}"] - at_start[f"cpu_seconds_{part}"], 2)
    run_cpu = figures["cpu_seconds_during_run_main"] + figures["cpu_seconds_during_run_helpers"]
    figures["cpu_seconds_during_run"] = round(run_cpu, 2)
    sized = next((event for event in events if event.get("event") == "workers_sized"), None)
    shadowed = "shadow" in tables
    name = ("pacs-ai paced" if paced else "pacs-ai") + ("+shadow" if shadowed else "")
    result = RunResult(name, associations, len(paths), acknowledged, round(seconds, 3),
                       round(acknowledged / seconds, 2), reported=reported,
                       seconds_to_last_report=round(last_report, 3),
                       images_per_second_reported=round(reported / last_report, 2)
                       if reported else 0.0,
                       latency_seconds=percentiles(latencies),
                       service_peak_rss_mb=figures["peak_rss_mb_total"], service=figures,
                       cpu_ms_per_film=round(1000 * run_cpu / acknowledged, 1)
                       if acknowledged else None,
                       workers=None if sized is None else {
                           key: sized.get(key) for key in (
                               "count", "processes", "helper_processes", "limited_by", "cpus",
                               "affinity_cpus", "cpu_quota", "memory_mb", "memory_source")})
    if not all_reported:
        result.notes.append(f"only {reported} of {acknowledged} reports within "
                            f"{report_timeout_s} s")
    if pacs.other_objects:
        result.notes.append(f"{pacs.other_objects} other objects (heat maps) besides the reports")
    if shadowed:
        result.shadow = shadow_statuses(work / "spool" / "jobs.sqlite")
        result.notes.append(f"the shadow finished {shadow_done_after} s after the first film "
                            "was sent; CPU counted until then")
        if result.shadow.get("assessed", 0) < acknowledged:
            result.notes.append(f"the shadow assessed {result.shadow.get('assessed', 0)} of "
                                f"{acknowledged} films: {result.shadow}")
    return result


def shadow_statuses(queue: Path) -> dict[str, int]:
    """The [shadow] model's results in a service's queue, counted by status (read-only: the
    service may be running)."""
    import sqlite3

    connection = sqlite3.connect(f"file:{queue}?mode=ro", uri=True, timeout=30)
    try:
        return dict(connection.execute(
            "SELECT status, COUNT(*) FROM shadow_results GROUP BY status").fetchall())
    except sqlite3.OperationalError:  # no such table yet
        return {}
    finally:
        connection.close()


# --- micro-figures --------------------------------------------------------------------------------

def decode_times(paths: list[Path], repeats: int) -> list[dict[str, Any]]:
    """Median seconds of pacs_ai.film.film_input.prepare (read, decode, preprocess) per file."""
    from pacs_ai.config import DEFAULT_MAX_PIXELS, FilterPolicy
    from pacs_ai.film.film_input import prepare

    rows = []
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True)
        timings, status = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            prepared = prepare(path, FilterPolicy(), DEFAULT_MAX_PIXELS)
            timings.append(time.perf_counter() - started)
            status = prepared.status
        rows.append({"file": path.name, "transfer_syntax": str(meta.file_meta.TransferSyntaxUID),
                     "transfer_syntax_name": meta.file_meta.TransferSyntaxUID.name,
                     "rows": int(meta.Rows), "columns": int(meta.Columns), "status": status,
                     "milliseconds_median": round(statistics.median(timings) * 1000, 1)})
    return rows


def model_times(batch_sizes: list[int], repeats: int,
                path: Path = MODEL_PATH) -> list[dict[str, Any]]:
    """Milliseconds per image of PneumoniaModel.predict at each batch size (median of runs)."""
    from pacs_ai.model.model import PneumoniaModel

    model = PneumoniaModel.load(path)
    rng = np.random.default_rng(0)
    rows = []
    for size in batch_sizes:
        batch = rng.random((size, 1, 200, 200), dtype=np.float32)
        model.predict(batch)  # warm-up: the first call pays TorchScript's optimisation
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.predict(batch)
            timings.append(time.perf_counter() - started)
        rows.append({"batch_size": size,
                     "milliseconds_per_image": round(statistics.median(timings) * 1000 / size, 2)})
    return rows


# --- output -----------------------------------------------------------------------------------------

def print_table(results: list[RunResult], decode: list[dict], model: list[dict],
                shadow_model: list[dict] | None = None) -> None:
    print("\nreceiver             assoc  sent  acked  recv img/s  reported  rep img/s  "
          "latency med/p95/max (s)  peak RSS MB  CPU ms/film  workers x helpers")
    for r in results:
        latency = ("/".join(str(r.latency_seconds.get(k, "-")) for k in ("median", "p95", "max"))
                   if r.latency_seconds else "-")
        workers = (f"{r.workers['count']} x {r.workers['processes']} "
                   f"({r.workers['limited_by']}, {r.workers['cpus']} CPUs)"
                   if r.workers else "-")
        print(f"{r.receiver:<20} {r.associations:>5} {r.sent:>5} {r.acknowledged:>6} "
              f"{r.images_per_second_received:>11} {r.reported if r.reported is not None else '-':>9} "
              f"{r.images_per_second_reported if r.images_per_second_reported is not None else '-':>10}  "
              f"{latency:<24} {r.service_peak_rss_mb or '-':>11}  "
              f"{r.cpu_ms_per_film if r.cpu_ms_per_film is not None else '-':>11}  {workers}"
              + (f"   NOTE: {'; '.join(r.notes)}" if r.notes else ""))
    print("\ndecode + preprocess (pacs_ai.film.film_input.prepare), median ms per image")
    for row in decode:
        print(f"  {row['milliseconds_median']:>8}  {row['transfer_syntax_name']:<45} "
              f"{row['rows']}x{row['columns']}  {row['status']}  {row['file']}")
    print("\nmodel (PneumoniaModel.predict), ms per image")
    for row in model:
        print(f"  batch {row['batch_size']:>3}: {row['milliseconds_per_image']}")
    if shadow_model:
        print("\nshadow model (PneumoniaModel.predict, as its thread runs it), ms per image")
        for row in shadow_model:
            print(f"  batch {row['batch_size']:>3}: {row['milliseconds_per_image']}")
    shadow_costs = [(plain, shadowed) for shadowed in results if shadowed.shadow is not None
                    for plain in results
                    if plain.receiver + "+shadow" == shadowed.receiver
                    and plain.associations == shadowed.associations]
    if shadow_costs:
        print("\nwhat the shadow costs per film (with shadow minus without, same set)")
        for plain, shadowed in shadow_costs:
            cpu = (f"{shadowed.cpu_ms_per_film - plain.cpu_ms_per_film:+.1f} ms CPU"
                   if shadowed.cpu_ms_per_film is not None and plain.cpu_ms_per_film is not None
                   else "-")
            latency = "-"
            if plain.latency_seconds and shadowed.latency_seconds:
                added = shadowed.latency_seconds["median"] - plain.latency_seconds["median"]
                latency = f"{added:+.3f} s median latency"
            print(f"  {plain.receiver:<14} at {plain.associations} association(s): {cpu}, "
                  f"{latency}; shadow results {shadowed.shadow}")


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()}


def parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """["workers.count=2"] -> {"workers": {"count": 2}}."""
    settings: dict[str, dict[str, Any]] = {}
    for item in items:
        name, separator, raw = item.partition("=")
        table, dot, key = name.partition(".")
        if not separator or not dot or not table or not key:
            raise ValueError(f"--set {item!r}: expected TABLE.KEY=VALUE, e.g. workers.count=2")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        settings.setdefault(table, {})[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40,
                        help="synthetic 2500x2048 DX files in the set (default 40)")
    parser.add_argument("--samples", type=int, default=None,
                        help="use only the first N ok files of sample_dicoms (default all)")
    parser.add_argument("--concurrency", default="1,2,4",
                        help="comma-separated numbers of parallel associations (default 1,2,4)")
    parser.add_argument("--receivers", default="storescp,pynetdicom,pacs-ai",
                        help="which receivers to run (default all three)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats per micro-figure (default 3)")
    parser.add_argument("--report-timeout", type=float, default=None,
                        help="seconds to wait for all reports (default 60 + 5 per image)")
    parser.add_argument("--paced", type=int, default=10,
                        help="also send N synthetic files one at a time, each after the last "
                             "one's report arrived: an idle service's latency (default 10, 0: no)")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="TABLE.KEY=VALUE",
                        help="override a pacs-ai config value, e.g. --set workers.count=2 "
                             "(repeatable; VALUE is read as JSON, else as a string)")
    parser.add_argument("--shadow", type=Path, default=None, metavar="MODEL",
                        help="also run each pacs-ai run with [shadow] model = MODEL, to show "
                             "what a shadow model costs per film")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(args.settings)
    except ValueError as error:
        parser.error(str(error))

    levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    receivers = [name.strip() for name in args.receivers.split(",") if name.strip()]
    unknown = set(receivers) - set(CALLED_AE)
    if unknown:
        parser.error(f"unknown receiver(s) {sorted(unknown)}; choose from {sorted(CALLED_AE)}")

    print(f"preparing {args.images} synthetic {SYNTHETIC_ROWS}x{SYNTHETIC_COLUMNS} DX files "
          f"in {CACHE_DIR} ...", flush=True)
    synthetic = synthetic_files(args.images)
    samples = sample_files(args.samples)
    paths = synthetic + samples
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    print(f"set: {len(synthetic)} synthetic + {len(samples)} samples = {len(paths)} files, "
          f"{megabytes:.1f} MB", flush=True)
    send_timeout = 120 + 10 * len(paths)
    report_timeout = args.report_timeout or 60 + 5 * len(paths)

    results: list[RunResult] = []
    # each pacs-ai run as configured, and again with the shadow when one is given
    service_variants = [settings]
    if args.shadow is not None:
        service_variants.append({**settings, "shadow": {"model": str(args.shadow.resolve())}})

    def record(label: str, run: Callable[[Path], RunResult]) -> None:
        """One run in a fresh folder, with the CPU it cost this process and its children."""
        with tempfile.TemporaryDirectory(prefix="bench-") as folder:
            print(f"-> {label} ...", flush=True)
            before = cpu_now()
            result = run(Path(folder))
            after = cpu_now()
        result.cpu_seconds = {"bench_process": round(after[0] - before[0], 2),
                              "child_processes": round(after[1] - before[1], 2)}
        if result.receiver == "pynetdicom" and result.acknowledged:
            # the bare SCP is a thread of this process, which is otherwise idle while sending
            result.cpu_ms_per_film = round(1000 * (after[0] - before[0]) / result.acknowledged, 1)
        results.append(result)
        print(f"   {asdict(result)}", flush=True)

    for associations in levels:
        for receiver in receivers:
            label = f"{receiver} at {associations} association(s)"
            if receiver == "storescp":
                record(label, lambda work: run_storescp(paths, associations, work, send_timeout))
            elif receiver == "pynetdicom":
                record(label, lambda work: run_pynetdicom(paths, associations, work,
                                                          send_timeout))
            else:
                for run_settings in service_variants:
                    record(label + (" with a shadow" if "shadow" in run_settings else ""),
                           lambda work: run_pacs_ai(paths, associations, work, send_timeout,
                                                    report_timeout, run_settings))
    if args.paced and "pacs-ai" in receivers:
        paced_files = synthetic_files(args.paced)
        for run_settings in service_variants:
            record(f"pacs-ai paced, {args.paced} images one at a time"
                   + (" with a shadow" if "shadow" in run_settings else ""),
                   lambda work: run_pacs_ai(paced_files, 1, work, send_timeout,
                                            report_timeout, run_settings, paced=True))

    decode = decode_times(samples + synthetic[:1], args.repeats)
    from pacs_ai.config import WorkersConfig

    batch_sizes = sorted({1, 8, WorkersConfig().batch_size})
    model = model_times(batch_sizes, max(args.repeats, 3))
    shadow_model = (model_times(batch_sizes, max(args.repeats, 3), args.shadow)
                    if args.shadow is not None else None)
    print_table(results, decode, model, shadow_model)

    if args.json is not None:
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "service_settings": settings,
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(), "files": len(paths), "synthetic_images": len(synthetic),
            "sample_images": len(samples), "megabytes": round(megabytes, 1),
            "runs": [asdict(result) for result in results],
            "decode_preprocess": decode, "model": model,
            "shadow_model": None if args.shadow is None else {
                "file": str(args.shadow), "milliseconds_per_image": shadow_model}}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
