"""Shadow mode: a candidate model assesses every film the live model assesses, on the very same
model input, and its results go to the job store only (`shadow_results`, pacs_ai.queue.jobs), for
`pacs-ai compare`. It never makes a report, never sends anything, and never holds up the live
one: a worker hands each assessed batch to the shadow's own thread once the batch's reports are
written, without waiting (ShadowRunner.submit), and the shadow assesses only while no worker
is processing a batch (LiveActivity), at the lowest CPU priority. When it falls behind (its
queue full), the films it misses are recorded as `busy`, so compare can say how many.

A shadow model is any model file the service could load (a contract-1 file without gate or
map too): its threshold and out-of-distribution threshold are the file's, or `[shadow]`'s,
a threshold bound to its file as `[model]`'s is (pacs_ai.model.site_threshold). The films are those
the live model's filters let through, the live model's age range and `[model] unknown_age`
included. Of those, a film whose patient age is known and outside the shadow model's own
intended range (its file's `intended_use.age_years`) is not assessed: recorded
`outside-intended-age`, with the age and the range as its reason, as the shadow would skip it
if promoted, so that `pacs-ai compare` leaves it out of the figures. A film without a known age
is assessed (the live model took it, so `[model] unknown_age` is "classify"). Films only the
shadow's range would take never reach it: a candidate with a wider range than the live model's
cannot be judged on them here.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from pacs_ai.config import Config, ShadowConfig
from pacs_ai.model.intended_use import (PatientAge, format_age_range, in_range, outside_reason,
                                        site_model_info)
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.site_threshold import check_binding, log_for_any_model
from pacs_ai.ops import metrics
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.shadow_records import Assessment, ShadowResult, ShadowStatus

log = structlog.get_logger()

# Films waiting for the shadow at most: 160 KB of model input each, so about 20 MB. Past it a
# film is not given to the shadow (recorded `busy`) rather than held or waited for.
QUEUE_FILMS = 128
DRAIN_SECONDS = 10.0  # at stop, films still queued get this long before they are `stopped`
POLL_SECONDS = 0.5
# Results are written in one transaction per this many films, or as soon as no batch waits:
# fewer, shorter write transactions beside the live pipeline's (on a connection of its own
# that does not fsync: JobStore.open(durable=False)).
WRITE_FILMS = 32
NOTHING = Assessment(None, None, None, None)  # a film the shadow did not assess


@dataclass(frozen=True)
class ShadowBatch:
    """What a worker hands over: its jobs, the model input it gave the live model, the live
    model's assessment of each film, and each film's patient age (None: no usable age)."""

    job_ids: Sequence[int]
    model_input: np.ndarray  # [N, 1, 200, 200] float32
    live: Sequence[Assessment]
    ages: Sequence[PatientAge | None]

    def films(self, indexes: Sequence[int]) -> ShadowBatch:
        """The batch of these films only."""
        return ShadowBatch([self.job_ids[i] for i in indexes], self.model_input[list(indexes)],
                           [self.live[i] for i in indexes], [self.ages[i] for i in indexes])


def assessments(model: PneumoniaModel, probabilities: Sequence[float],
                ood_scores: Sequence[float] | None) -> list[Assessment]:
    """A model's assessments of a batch: its finding at its threshold in force, or its
    abstention above its out-of-distribution threshold (the probability is kept either way)."""
    result = []
    for index, probability in enumerate(probabilities):
        score = None if ood_scores is None else float(ood_scores[index])
        abstained = model.abstain_reason(score) is not None
        result.append(Assessment(float(probability), score, abstained,
                                 None if abstained else model.finding(float(probability))))
    return result


def load_shadow_model(config: Config) -> PneumoniaModel | None:
    """The [shadow] model with its site settings, or None without one. Raises UserError for a
    file that breaks the contract or a threshold chosen for another file. Logs nothing (the
    service logs it: log_shadow_model; `pacs-ai model --config` prints it)."""
    settings = config.shadow
    if settings.model is None:
        return None
    model = PneumoniaModel.load(settings.model)
    own = model.info
    check_binding(settings.site_threshold, own, model.sha256 or "")
    model.info = site_model_info(own, threshold=settings.threshold,
                                 ood_threshold=settings.ood_threshold, table="[shadow]")
    return model


def log_shadow_model(model: PneumoniaModel, settings: ShadowConfig,
                     live_age_years: tuple[float, float] | None) -> None:
    """The start-up lines naming the shadow model and its settings; and, where its intended age
    range is not the live model's in force (`live_age_years`), one line naming both."""
    own = model.info.metadata
    shadow_age_years = model.info.intended_age_years
    log_for_any_model(settings.site_threshold, model.info.label)
    log.info("shadow_model", model=model.info.label, model_path=str(model.path),
             sha256=model.sha256, format=own.get("format"),
             threshold=model.info.threshold, model_threshold=own.get("threshold"),
             ood_threshold=model.info.ood_threshold,
             intended_age_years=(format_age_range(shadow_age_years)
                                 if shadow_age_years else None),
             detail="assesses every film the live model assesses (within its own intended age "
                    "range); results kept in the job queue for pacs-ai compare, never reported")
    if shadow_age_years != live_age_years:
        log.warning("shadow_age_range_differs",
                    shadow_age_years=_describe_range(shadow_age_years),
                    live_age_years=_describe_range(live_age_years),
                    detail="the shadow sees only the films the live model's range lets "
                           "through; of those, films outside its own range are recorded "
                           "outside-intended-age, not assessed, and pacs-ai compare counts them "
                           "apart; films only its range would take cannot be compared")


def _describe_range(age_range: tuple[float, float] | None) -> str:
    return format_age_range(age_range) if age_range is not None else "every age"


SHADOW_NICE = 19  # the lowest CPU priority: the live pipeline comes first
IDLE_SETTLE_SECONDS = 0.1  # the workers idle this long: no live batch follows right away


class LiveActivity:
    """Whether the workers are processing a batch. The shadow assesses only while none is,
    so that under a burst its work waits until the live reports are out (on a machine that
    receives a film a minute, the workers are idle nearly all the time)."""

    def __init__(self) -> None:
        self._busy = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._changed:
            self._busy += 1
        try:
            yield
        finally:
            with self._changed:
                self._busy -= 1
                self._changed.notify_all()

    def wait_idle(self, stop: threading.Event, timeout: float) -> bool:
        """Wait until no worker has been busy for IDLE_SETTLE_SECONDS (True), `stop` is set,
        or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._busy:
                    self._changed.wait(min(remaining, POLL_SECONDS))
                    continue
                # idle now: and still after a moment? (a worker with a backlog claims again)
                self._changed.wait(IDLE_SETTLE_SECONDS)
                if not self._busy:
                    return True
        return True


def lower_own_priority() -> None:
    """Give the calling thread (and the torch worker threads it starts, which inherit it) the
    lowest CPU priority, so that on a busy machine the shadow yields to the live pipeline and
    falls behind (its films recorded `busy`) rather than slowing the reports. Linux threads
    have their own nice value; elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
    except (AttributeError, OSError) as error:
        log.warning("shadow_priority_unchanged", error=str(error))


class ShadowRunner(threading.Thread):
    """The shadow model's thread: assesses the batches workers hand over and records both
    models' results. Stopped with finish() once the workers have stopped."""

    def __init__(self, model: PneumoniaModel, live: PneumoniaModel, store: JobStore,
                 queue_films: int = QUEUE_FILMS, activity: LiveActivity | None = None):
        super().__init__(name="shadow", daemon=True)
        self.model = model
        self.live = live
        self.store = store
        # the workers' activity: the shadow assesses only while they are idle
        self.activity = activity or LiveActivity()
        self.queue_films = queue_films
        self._queue: queue.Queue[ShadowBatch] = queue.Queue()
        self._lock = threading.Lock()
        self._queued_films = 0
        self._missed: list[ShadowResult] = []  # `busy` films, written with the next batch
        self._finish = threading.Event()

    # --- the workers' side: never blocks ----------------------------------------------------

    def submit(self, batch: ShadowBatch) -> None:
        films = len(batch.job_ids)
        with self._lock:
            if self._finish.is_set() or self._queued_films + films > self.queue_films:
                self._missed.extend(self._not_assessed(batch, ShadowStatus.BUSY,
                                                       "the shadow's queue was full"))
                metrics.SHADOW_NOT_ASSESSED.labels(reason=ShadowStatus.BUSY).inc(films)
                return
            self._queued_films += films
        self._queue.put(batch)

    def finish(self) -> None:
        """No more batches: assess what is queued (up to DRAIN_SECONDS), then stop."""
        self._finish.set()

    # --- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        lower_own_priority()
        drain_deadline = None
        unwritten: list[ShadowResult] = []
        while True:
            if self._finish.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + DRAIN_SECONDS
            try:
                batch = self._queue.get(timeout=POLL_SECONDS if not unwritten else 0)
            except queue.Empty:  # nothing waits: write what there is
                self._record(unwritten + self._take_missed())
                unwritten = []
                if self._finish.is_set():
                    return
                continue
            with self._lock:
                self._queued_films -= len(batch.job_ids)
            while not self.activity.wait_idle(self._finish, POLL_SECONDS):
                if unwritten:  # while the live work goes on, what is assessed gets written
                    self._record(unwritten + self._take_missed())
                    unwritten = []
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                metrics.SHADOW_NOT_ASSESSED.labels(reason=ShadowStatus.STOPPED).inc(
                    len(batch.job_ids))
                unwritten += self._not_assessed(batch, ShadowStatus.STOPPED,
                                                "the service stopped first")
            else:
                unwritten += self._assess(batch)
            if len(unwritten) >= WRITE_FILMS:
                self._record(unwritten + self._take_missed())
                unwritten = []

    def _assess(self, batch: ShadowBatch) -> list[ShadowResult]:
        """The batch's results in its order: films outside the shadow model's own age range
        recorded as such, the others assessed."""
        reasons = [self._outside_age(age) for age in batch.ages]
        outside = [index for index, reason in enumerate(reasons) if reason is not None]
        inside = [index for index, reason in enumerate(reasons) if reason is None]
        results: dict[int, ShadowResult] = {}
        if outside:
            metrics.SHADOW_NOT_ASSESSED.labels(
                reason=ShadowStatus.OUTSIDE_INTENDED_AGE).inc(len(outside))
            now = time.time()
            for index in outside:
                results[index] = self._result(
                    batch.job_ids[index], ShadowStatus.OUTSIDE_INTENDED_AGE, NOTHING,
                    batch.live[index], reasons[index], now)
        if inside:
            films = batch if not outside else batch.films(inside)
            results.update(zip(inside, self._assess_films(films)))
        return [results[index] for index in range(len(batch.job_ids))]

    def _outside_age(self, age: PatientAge | None) -> str | None:
        """Why the shadow model, promoted, would skip a film of this age (the live filter's
        reason), or None: no usable age, no range in its file, or in range."""
        age_range = self.model.info.intended_age_years
        if age is None or age_range is None or in_range(age.years, age_range):
            return None
        return outside_reason(age, age_range)

    def _assess_films(self, batch: ShadowBatch) -> list[ShadowResult]:
        started = time.perf_counter()
        try:
            probabilities, ood_scores = self.model.assess(batch.model_input)
        except Exception as error:  # a candidate's fault must not touch the live service
            log.error("shadow_model_failed", films=len(batch.job_ids),
                      error=f"{type(error).__name__}: {error}")
            metrics.SHADOW_NOT_ASSESSED.labels(reason=ShadowStatus.MODEL_FAILED).inc(
                len(batch.job_ids))
            return self._not_assessed(batch, ShadowStatus.MODEL_FAILED,
                                      f"{type(error).__name__}: {error}")
        metrics.SHADOW_SECONDS.observe((time.perf_counter() - started) / len(batch.job_ids))
        now = time.time()
        results = []
        for job_id, mine, live in zip(batch.job_ids,
                                      assessments(self.model, probabilities, ood_scores),
                                      batch.live):
            metrics.count_assessment(self.model.info, metrics.ROLE_SHADOW,
                                     metrics.RESULT_ABSTAINED if mine.abstained
                                     else str(mine.finding), mine.ood_score)
            results.append(self._result(job_id, ShadowStatus.ASSESSED, mine, live, None, now))
        return results

    def _not_assessed(self, batch: ShadowBatch, status: ShadowStatus,
                      reason: str) -> list[ShadowResult]:
        now = time.time()
        return [self._result(job_id, status, NOTHING, live, reason, now)
                for job_id, live in zip(batch.job_ids, batch.live)]

    def _result(self, job_id: int, status: ShadowStatus, mine: Assessment, live: Assessment,
                reason: str | None, now: float) -> ShadowResult:
        shadow, live_model = self.model, self.live
        return ShadowResult(
            job_id=job_id, model_name=shadow.info.name, model_version=shadow.info.version,
            model_sha256=shadow.sha256 or "", threshold=shadow.info.threshold, status=status,
            shadow=mine, live_model_name=live_model.info.name,
            live_model_version=live_model.info.version,
            live_model_sha256=live_model.sha256 or "", live_threshold=live_model.info.threshold,
            live=live, reason=reason, assessed_at=now)

    def _take_missed(self) -> list[ShadowResult]:
        with self._lock:
            missed, self._missed = self._missed, []
        return missed

    def _record(self, results: list[ShadowResult]) -> None:
        if not results:
            return
        try:
            self.store.record_shadow_results(results)
        except Exception as error:  # a full disk and the like: the shadow's rows are lost,
            # never the live service's work
            log.error("shadow_results_not_recorded", films=len(results), error=str(error))
            metrics.SHADOW_NOT_ASSESSED.labels(reason="not-recorded").inc(len(results))
