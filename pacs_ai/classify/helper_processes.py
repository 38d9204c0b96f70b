"""The per-image CPU work of a worker, run in helper processes.

Why: the listener, the queue and the senders are Python threads of one process and share its
interpreter lock. Decoding a 10 MB film and building its SR is about 45 ms of CPU per image
(27 + 16 ms, docs/benchmarks.md), a compressed one up to 250 ms; in a helper process it runs on
another core while the listener keeps receiving. It also contains a crash: a decoder that dies (a
segfault in a C codec) takes down only the helper. The pool is restarted and the calls that were
in flight run again one at a time, so the one image that crashed it is failed with reason
`decode-crashed` and every other image is processed normally.

Two kinds of work, both plain functions of picklable arguments:
- `prepare_image`: `pacs_ai.film.film_input.prepare` (filter -> decode -> the one preprocessing step),
  exactly as `pacs-ai classify` does it; from that one read and decode it keeps what the report
  needs (`KeptFilm`: the checked source header and, when heat-map images are on, the film drawn
  at the heat-map image's size from that decode), which travels back with the model input;
- `render_report`: build the SR from the kept header (with the region its saliency map
  outlines, for a film reported as pneumonia), encode it to bytes; and the heat-map image when
  asked, from the kept picture (the file is read again only where the model input's decode
  cannot serve the picture: a JPEG 2000 or JPEG film large enough that the codec decodes it
  coarser for the model than for the picture). The worker writes the bytes durably itself, so
  the queue and the spool stay in one process.

A batch's films go to the helpers for prepare in one message per helper (`run_calls`), not one
per film; reports go one per message (each brings back megabytes of encoded SR and heat map).

`processes = 0` in [workers] runs the same functions in the worker thread (no helper).
The model stays in the service process: inference releases the lock and is 6 ms per image.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog
from pydicom.dataset import Dataset

from pacs_ai.config import FilterPolicy
from pacs_ai.errors import UserError
from pacs_ai.film.film_input import Prepared, prepare
from pacs_ai.film.pixels_reduced import SmallDecode
from pacs_ai.model.model import ModelInfo

log = structlog.get_logger()

T = TypeVar("T")


class HelperPoolStopped(Exception):
    """The helper died while the service was stopping: the batch stays in `classifying` and
    start-up puts it back to pending (never failed for a routine stop)."""


@dataclass(frozen=True)
class RenderedReport:
    """An encoded SR, or why none could be built (`error` is "report-failed: ...")."""
    report_uid: str | None = None
    data: bytes | None = None
    error: str | None = None
    # the heat-map image (Secondary Capture), when one was asked for and could be made;
    # heatmap_error says why not otherwise (the report is sent without it)
    heatmap_uid: str | None = None
    heatmap_data: bytes | None = None
    heatmap_error: str | None = None


@dataclass(frozen=True)
class KeptFilm:
    """What the report step needs of a film, kept from its one read in prepare_image."""
    header: Dataset | None = None  # pacs_ai.report.report.source_header's checked copy
    error: str | None = None  # why no report can be made of the film ("report-failed: ...")
    # the film's grey part of the heat-map picture (heatmap_image.picture_film), drawn from the
    # model input's decode; None: render_report draws it from the file if a heat map is wanted
    heatmap_film: Any = None


def prepare_image(path: Path, policy: FilterPolicy, max_pixels: int,
                  keep_for_report: bool = False, heatmap: bool = False) -> Prepared:
    """`keep_for_report`: keep the film's KeptFilm in `Prepared.kept`; `heatmap`: a heat-map
    image may be drawn of it (its picture is kept where that saves decoding it again)."""
    if not keep_for_report:
        return prepare(path, policy, max_pixels)
    return prepare(path, policy, max_pixels,
                   keep=lambda dataset, decoded: keep_for_report_step(dataset, decoded, heatmap))


def keep_for_report_step(dataset: Dataset, decoded: SmallDecode, heatmap: bool) -> KeptFilm:
    """The header (or why there is none) and, when a heat-map image may be drawn of the film,
    its picture drawn from the model input's decode: reading and decoding a 10 MB film again
    for its heat map cost 11 ms more than drawing the picture here (about 5 ms, paid for the
    films that get no heat map too; bench/step_costs.py)."""
    from pacs_ai.report.report import source_header

    try:
        header = source_header(dataset)
    except Exception as error:  # ReportSourceError, a header pydicom cannot copy
        return KeptFilm(error=f"report-failed: {error}")
    if not heatmap:
        return KeptFilm(header=header)
    from pacs_ai.report.heatmap_image import picture_film

    try:
        film = picture_film(dataset, decoded)  # None where the picture needs its own decode
    except Exception:  # drawn again from the file, if wanted, where the error is reported
        film = None
    return KeptFilm(header=header, heatmap_film=film)


def render_report(image_path: Path, probability: float, model: ModelInfo,
                  sr_kind: str, saliency: Any = None, heatmap_image: bool = False,
                  kept: KeptFilm | None = None) -> RenderedReport:
    """The SR for one classified image, encoded; errors come back as values (some highdicom
    exceptions do not survive pickling). `saliency`: the film's normalised map grid
    (pacs_ai.model.heatmap) or None; `heatmap_image`: also make the heat-map image from it.
    `kept`: what prepare_image kept of the film; without it the file is read here."""
    import pydicom

    from pacs_ai.model.heatmap import region_polygon, to_film
    from pacs_ai.report.report import build_report_from_header, source_header

    source = None
    try:
        if kept is None:
            source = pydicom.dcmread(image_path, stop_before_pixels=not heatmap_image)
            header = source_header(source)
        elif kept.header is None:
            return RenderedReport(error=kept.error or "report-failed: no header was kept")
        else:
            header = kept.header
        region = None
        if saliency is not None and probability >= model.threshold:
            polygon = region_polygon(saliency)
            if polygon is not None:
                region = to_film(polygon, saliency.shape, int(header.Rows), int(header.Columns))
        report = build_report_from_header(header, probability, model, sr_kind=sr_kind,
                                          region=region)
        encoded = io.BytesIO()
        report.save_as(encoded, enforce_file_format=True)
    except Exception as error:  # ReportSourceError, ValueError, highdicom's checks
        return RenderedReport(error=f"report-failed: {error}")
    rendered = RenderedReport(report_uid=str(report.SOPInstanceUID), data=encoded.getvalue())
    if heatmap_image and saliency is not None:
        film = kept.heatmap_film if kept is not None else None
        return _with_heatmap(rendered, image_path, source, header, film, saliency, region,
                             probability, model)
    return rendered


def _with_heatmap(rendered: RenderedReport, image_path: Path, source: Dataset | None,
                  header: Dataset, film: Any, saliency: Any, region: Any, probability: float,
                  model: ModelInfo) -> RenderedReport:
    """The rendered report with its heat-map image, or with heatmap_error saying why none.
    `film`: the picture's film part kept from prepare; else drawn from `source` (read with its
    pixels) or the file."""
    from dataclasses import replace

    import pydicom

    from pacs_ai.report.heatmap_image import build_heatmap_image, picture_film

    try:
        if film is None:
            # decoded no larger than the picture needs (a whole-factor reduction, at least the
            # picture's size on each side), never a full-size float copy of a large film
            film = picture_film(source if source is not None else pydicom.dcmread(image_path))
        image = build_heatmap_image(header, None, saliency, region, probability, model,
                                    film=film)
        del film
        encoded = io.BytesIO()
        image.save_as(encoded, enforce_file_format=True)
    except Exception as error:  # the report goes without it
        return replace(rendered, heatmap_error=f"heatmap-failed: {type(error).__name__}: "
                                               f"{error}")
    return replace(rendered, heatmap_uid=str(image.SOPInstanceUID),
                   heatmap_data=encoded.getvalue())


PARENT_CHECK_SECONDS = 1.0
HELPER_START_SECONDS = 120.0  # imports on a slow disk; a helper that takes longer is broken


def _start_helper(log_level: str, log_format: str, priority_prefix: str = "auto") -> None:
    """In each helper: the service's log set-up; stopping is the service's job (systemd sends
    SIGTERM to the whole unit, and a helper that died mid-batch would fail the batch), except
    when the service itself is gone (kill -9, a crash): then the helper ends within a second
    instead of waiting forever on a queue nobody writes to."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from pacs_ai.ops.logs import configure_logging

    configure_logging(log_level, log_format, priority_prefix)
    # the pid spawn recorded, not getppid(): the service may already be gone by now
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                     name="parent-watch").start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _warm_up() -> int:
    # highdicom and the heat-map drawing once, before the first image
    import pacs_ai.report.heatmap_image  # noqa: F401
    import pacs_ai.report.report  # noqa: F401

    return os.getpid()


# Native libraries in the helpers run single-threaded: each helper is one of the service's
# parallel lanes already, and OpenBLAS or OpenMP pools sized to the whole machine in every helper
# oversubscribe it (the helpers' CPU per film grew with the core count on a 16-core machine,
# docs/benchmarks.md). An administrator's own setting wins.
HELPER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """os.environ as spawned helpers should inherit it, for the time helpers are started."""
    added = [name for name in HELPER_THREAD_VARIABLES if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class HelperPool:
    """Runs prepare_image / render_report for batches, in helper processes or in-thread.
    Used by one worker thread (not thread-safe)."""

    def __init__(self, processes: int, *, log_level: str = "info", log_format: str = "auto",
                 priority_prefix: str = "auto", is_stopping: Callable[[], bool] = lambda: False):
        self.processes = processes
        self._log_args = (log_level, log_format, priority_prefix)
        self._is_stopping = is_stopping
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0  # counts pool restarts
        if processes:
            self._pool = self._new_pool()
            self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Start the helpers now and wait for their imports: the first film is not slowed by
        them, and a helper that cannot start stops start-up with a message instead of failing
        every film as a crash."""
        assert self._pool is not None
        try:
            for warm_up in self._spawn_all_helpers(self._pool):
                warm_up.result(timeout=HELPER_START_SECONDS)
        except Exception as error:
            self.close(wait=False)
            raise UserError(f"the image helper process did not start ({type(error).__name__}: "
                            f"{error}); set [workers] processes = 0 to decode in the service "
                            "process instead") from None

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, never fork: the service has threads (a forked lock may be held forever)
        return ProcessPoolExecutor(max_workers=self.processes,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_helper, initargs=self._log_args)

    def _spawn_all_helpers(self, pool: ProcessPoolExecutor) -> list[Future[int]]:
        """Start every helper now. A spawn pool starts a helper per submitted call while none is
        idle, so one warm-up call per helper, submitted together, starts them all: otherwise
        they would start (and import) one by one during the first burst of films."""
        with _single_threaded_children():
            return [pool.submit(_warm_up) for _ in range(self.processes)]

    def start_prepare(self, paths: Sequence[Path], policy: FilterPolicy, max_pixels: int, *,
                      keep_for_report: bool = False,
                      heatmap: bool = False) -> PendingWork[Prepared]:
        """Hand the images to the helper now; `.results()` waits for them. The worker starts
        its next batch this way while it writes the current one's reports. `keep_for_report`,
        `heatmap`: as prepare_image's."""
        calls = [(prepare_image, (path, policy, max_pixels, keep_for_report, heatmap))
                 for path in paths]
        crashed = [Prepared(path, status="error",
                            reason="decode-crashed: the helper process decoding this image died "
                                   "(a decoder crash); other images are unaffected")
                   for path in paths]
        return PendingWork(self, calls, crashed)

    def start_render(self, items: Sequence[tuple[Path, KeptFilm | None, float, Any, bool]],
                     model: ModelInfo, sr_kind: str) -> PendingWork[RenderedReport]:
        """items: (image path, what prepare kept of it or None, probability, saliency grid or
        None, make the heat-map image)."""
        calls = [(render_report, (path, probability, model, sr_kind, saliency, heatmap_image,
                                  kept))
                 for path, kept, probability, saliency, heatmap_image in items]
        crashed = [RenderedReport(error="report-failed: the helper process building this "
                                        "report died")] * len(items)
        # one message per report: each brings back an encoded SR and heat-map image (about
        # 2 MB for a 10 MB film); a batch's together raised the helper's peak memory by 9 MB
        return PendingWork(self, calls, crashed, together=False)

    def _submit(self, function: Callable[..., T], args: tuple[Any, ...]) -> tuple[Future[T], int]:
        assert self._pool is not None
        return self._pool.submit(function, *args), self._generation

    def _restart_after_crash(self, generation: int) -> None:
        """Replace the broken pool, once per crash: calls of an earlier batch that were in the
        same pool see the same broken pool later and must not restart the new one."""
        if self._is_stopping():
            raise HelperPoolStopped("helper process ended during shutdown")
        if generation != self._generation:
            return
        log.error("image_helper_crashed", processes=self.processes)
        old = self._pool
        self._pool = self._new_pool()
        self._generation += 1
        self._spawn_all_helpers(self._pool)  # not waited for: the calls queue behind them
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


# A helper that died fails every call in flight; calls still queued in that pool may instead
# be cancelled when it is replaced.
POOL_GONE = (BrokenProcessPool, CancelledError)


def run_calls(calls: list[tuple[Callable[..., T], tuple[Any, ...]]]) -> list[T]:
    """Several calls in one message to a helper, their results in one message back."""
    return [function(*args) for function, args in calls]


def in_shares(items: list[Any], shares: int) -> list[list[Any]]:
    """`items` in at most `shares` runs of consecutive items, as even as can be."""
    size = -(-len(items) // max(1, shares))
    return [items[start:start + size] for start in range(0, len(items), size)]


class PendingWork(Generic[T]):
    """Calls handed to the helper, whose results are collected later by the same thread.

    `together`: the calls go in one message per helper (a batch of four films to one helper:
    one message each way instead of four), shared out over the helpers; else one message per
    call (calls whose results are large, so that a helper holds and pickles one result at a
    time, not a batch's). When a helper dies, every call in
    flight fails, its own or not. Those calls are then run again one at a time in the new
    helper, so a crash names the one image that caused it; the others get their normal results.
    Without a helper (`processes = 0`) the calls run at once, in the calling thread.
    """

    def __init__(self, work: HelperPool, calls: list[tuple[Callable[..., T], tuple[Any, ...]]],
                 crashed: list[T], together: bool = True):
        self._work = work
        self._calls = calls
        self._crashed = crashed
        self._done: list[T] | None = None
        self._futures: list[Future[list[T]]] = []
        self._generation = work._generation  # the pool these calls went to
        if work._pool is None or not calls:
            self._done = run_calls(calls)
            return
        self._shares = in_shares(calls, work.processes) if together else [[c] for c in calls]
        try:
            for share in self._shares:
                future, self._generation = work._submit(run_calls, (share,))
                self._futures.append(future)
        except BrokenProcessPool:
            self._futures = []  # results() runs them one at a time

    def results(self) -> list[T]:
        if self._done is not None:
            return self._done
        if self._futures and len(self._futures) == len(self._shares):
            try:
                self._done = [result for future in self._futures for result in future.result()]
                return self._done
            except POOL_GONE:
                pass
        self._work._restart_after_crash(self._generation)
        self._done = self._one_at_a_time()
        return self._done

    def _one_at_a_time(self) -> list[T]:
        results: list[T] = []
        for (function, args), crash_result in zip(self._calls, self._crashed):
            future, generation = self._work._submit(function, args)
            try:
                results.append(future.result())
            except POOL_GONE:
                self._work._restart_after_crash(generation)
                results.append(crash_result)
        return results
