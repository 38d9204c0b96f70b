"""The per-image CPU work of a worker, run in helper processes.

Why: the listener, the queue and the senders are Python threads of one process and share its
interpreter lock. Decoding a 10 MB film and building its SR is about 60 ms of mostly-Python CPU
per image (profile in docs/benchmarks.md); in a helper process it runs on another core while the
listener keeps receiving. It also contains a crash: a decoder that dies (a segfault in a C codec)
takes down only the helper. The pool is restarted and the one image that crashed it again, alone,
is failed with reason `decode-crashed`; every other image of the batch is processed normally.

Two kinds of work, both plain functions of picklable arguments:
- `prepare_image`: `pacs_ai.classify.prepare` (filter -> decode -> the one preprocessing step),
  exactly as `pacs-ai classify` does it;
- `render_report`: read the source header, build the SR, encode it to bytes. The worker writes
  the bytes durably itself, so the queue and the spool stay in one process.

`processes = 0` in [workers] runs the same functions in the worker thread (no helper).
The model stays in the service process: inference releases the lock and is 6 ms per image.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from pacs_ai.classify import Prepared, prepare
from pacs_ai.errors import UserError
from pacs_ai.filters import FilterPolicy
from pacs_ai.model import ModelInfo

log = structlog.get_logger()

T = TypeVar("T")


class ImageWorkStopped(Exception):
    """The helper died while the service was stopping: the batch stays in `classifying` and
    start-up puts it back to pending (never failed for a routine stop)."""


@dataclass(frozen=True)
class RenderedReport:
    """An encoded SR, or why none could be built (`error` is "report-failed: ...")."""
    report_uid: str | None = None
    data: bytes | None = None
    error: str | None = None


def prepare_image(path: Path, policy: FilterPolicy, max_pixels: int) -> Prepared:
    return prepare(path, policy, max_pixels)


def render_report(image_path: Path, probability: float, model: ModelInfo,
                  sr_kind: str) -> RenderedReport:
    """The SR for one classified image, encoded; errors come back as values (some highdicom
    exceptions do not survive pickling)."""
    import pydicom

    from pacs_ai.report import build_report

    try:
        source = pydicom.dcmread(image_path, stop_before_pixels=True)
        report = build_report(source, probability, model, sr_kind=sr_kind)
        encoded = io.BytesIO()
        report.save_as(encoded, enforce_file_format=True)
    except Exception as error:  # ReportSourceError, ValueError, highdicom's checks
        return RenderedReport(error=f"report-failed: {error}")
    return RenderedReport(report_uid=str(report.SOPInstanceUID), data=encoded.getvalue())


PARENT_CHECK_SECONDS = 1.0
HELPER_START_SECONDS = 120.0  # imports on a slow disk; a helper that takes longer is broken


def _start_helper(log_level: str, log_format: str) -> None:
    """In each helper: the service's log set-up; stopping is the service's job (systemd sends
    SIGTERM to the whole unit, and a helper that died mid-batch would fail the batch), except
    when the service itself is gone (kill -9, a crash): then the helper ends within a second
    instead of waiting forever on a queue nobody writes to."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from pacs_ai.logs import configure_logging

    configure_logging(log_level, log_format)
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
    import pacs_ai.report  # noqa: F401  (imports highdicom once, before the first image)

    return 0


class ImageWork:
    """Runs prepare_image / render_report for a batch, in helper processes or in-thread."""

    def __init__(self, processes: int, *, log_level: str = "info", log_format: str = "auto",
                 is_stopping: Callable[[], bool] = lambda: False):
        self.processes = processes
        self._log_args = (log_level, log_format)
        self._is_stopping = is_stopping
        self._pool: ProcessPoolExecutor | None = None
        if processes:
            self._pool = self._new_pool()
            self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Start the helpers now and wait for their imports: the first film is not slowed by
        them, and a helper that cannot start stops start-up with a message instead of failing
        every film as a crash."""
        assert self._pool is not None
        try:
            self._pool.submit(_warm_up).result(timeout=HELPER_START_SECONDS)
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

    def prepare(self, paths: Sequence[Path], policy: FilterPolicy,
                max_pixels: int) -> list[Prepared]:
        calls = [(prepare_image, (path, policy, max_pixels)) for path in paths]
        crashed = [Prepared(path, status="error",
                            reason="decode-crashed: the helper process decoding this image died "
                                   "(a decoder crash); other images are unaffected")
                   for path in paths]
        return self._run(calls, crashed)

    def render_reports(self, items: Sequence[tuple[Path, float]], model: ModelInfo,
                       sr_kind: str) -> list[RenderedReport]:
        calls = [(render_report, (path, probability, model, sr_kind))
                 for path, probability in items]
        crashed = [RenderedReport(error="report-failed: the helper process building this "
                                        "report died")] * len(items)
        return self._run(calls, crashed)

    def _run(self, calls: list[tuple[Callable[..., T], tuple[Any, ...]]],
             crashed: list[T]) -> list[T]:
        if self._pool is None:
            return [function(*args) for function, args in calls]
        try:
            futures: list[Future[T]] = [self._pool.submit(function, *args)
                                        for function, args in calls]
            return [future.result() for future in futures]
        except BrokenProcessPool:
            self._restart_after_crash()
        # one at a time, so a crash names its own image
        results: list[T] = []
        for (function, args), crash_result in zip(calls, crashed):
            try:
                results.append(self._pool.submit(function, *args).result())
            except BrokenProcessPool:
                self._restart_after_crash()
                results.append(crash_result)
        return results

    def _restart_after_crash(self) -> None:
        if self._is_stopping():
            raise ImageWorkStopped("helper process ended during shutdown")
        log.error("image_helper_crashed", processes=self.processes)
        old = self._pool
        self._pool = self._new_pool()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
