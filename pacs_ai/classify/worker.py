"""Classification workers: take pending jobs, classify them, put the report in the outbox.

A worker uses exactly the steps of `pacs-ai classify` (`pacs_ai.film.film_input.prepare`: filter ->
decode pixels -> the one preprocessing function), then the model on a batch, so the service and
the offline classifier give the same probability for the same file. When a backlog builds, a
worker claims up to `[workers] batch_size` jobs at once; a lone image is classified alone.
Decoding and building the SR run in a helper process (`pacs_ai.classify.helper_processes`), the model here;
the helper reads each film once, and what the report needs of it comes back with the model input
(`KeptFilm`) and goes back with the probability.
Under a backlog the next batch is claimed, and its images handed to the helper, while this
batch's reports are written; a worker that stops gives that batch back to pending.

Outcomes per job: skipped (the filter's reason), failed at stage "classify" (the pixel path's
reason) or "report" (the SR cannot be built), or reported (SR fsynced in outbox/, deliveries
queued). A film reported without a usable patient age in its header is counted as such (the
job's age_known, pacs_ai_classified_without_age_total, age_known=false on its log line).
A crash mid-batch leaves the jobs in `classifying`; start-up puts them back to pending.
A full disk (report or queue write) is temporary, not a failure: the worker backs off and puts
the batch's unfinished jobs back to pending once the queue can be written again.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from pacs_ai.classify.helper_processes import (HelperPool, HelperPoolStopped, KeptFilm, PendingWork,
                                               RenderedReport)
from pacs_ai.classify.shadow import ShadowBatch, ShadowRunner, assessments
from pacs_ai.config import Config
from pacs_ai.deliver.routing import RouteFacts, choose_route
from pacs_ai.film.film_input import Prepared, PrepareStatus
from pacs_ai.finding import Finding
from pacs_ai.model.intended_use import PatientAge
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.ops import metrics
from pacs_ai.queue.job_records import Job, JobState, Stage
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool

log = structlog.get_logger()

IDLE_POLL_SECONDS = 0.5  # also how soon a `pacs-ai retry` from another process is noticed
STORAGE_BACKOFF_FIRST_SECONDS = 1.0  # after a full disk; doubles while it stays full
STORAGE_BACKOFF_MAX_SECONDS = 30.0

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# SQLITE_FULL, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR (extended codes keep these low bits)
_TEMPORARY_SQLITE_CODES = {13, 5, 6, 10}


def is_temporary_storage_error(error: BaseException) -> bool:
    """A full disk or quota, or a queue write SQLite could not do right now: worth retrying."""
    if isinstance(error, sqlite3.OperationalError):
        code = getattr(error, "sqlite_errorcode", None)
        return (code is not None and (code & 0xFF) in _TEMPORARY_SQLITE_CODES) \
            or "disk is full" in str(error)
    return isinstance(error, OSError) and error.errno in _FULL_ERRNOS


@dataclass
class _Batch:
    """Claimed jobs whose images the helper is preparing (or has prepared)."""
    jobs: list[Job]
    prepared: PendingWork[Prepared] | None
    error: Exception | None = None  # handing the images over failed: the batch fails with it


@dataclass
class _Ready:
    job: Job
    model_input: np.ndarray
    prepare_seconds: float
    age_known: bool | None  # the header gave a usable patient age
    kept: KeptFilm | None  # what the helper kept of the film for its report
    age: PatientAge | None = None  # that age: a [shadow] model checks its own range on it


class ClassificationWorker(threading.Thread):
    def __init__(self, name: str, config: Config, spool: Spool, store: JobStore,
                 model: PneumoniaModel, stop: threading.Event, wake: threading.Event,
                 on_job_finished: Callable[[Job], None], helper_pool: HelperPool,
                 shadow: ShadowRunner | None = None):
        super().__init__(name=name, daemon=True)
        self.config = config
        self.shadow = shadow  # [shadow]: gets each assessed batch after its reports
        # while this worker processes a batch the shadow waits (pacs_ai.classify.shadow.LiveActivity)
        self.activity = shadow.activity if shadow is not None else None
        self.helper_pool = helper_pool
        self.spool = spool
        self.store = store
        self.model = model
        self.stop_event = stop
        self.wake = wake
        self.on_job_finished = on_job_finished
        # [filters] plus the model's intended age range (the site's, where [model] sets one)
        # and what to do with films without an age ([model] unknown_age)
        self.filters = config.filters.with_intended_age(model.info.intended_age_years,
                                                        config.model.unknown_age)
        # whether a film may get a heat-map image (the helper then keeps what draws it)
        self.heatmaps = config.report.heatmap and model.has_saliency
        self._storage_backoff = STORAGE_BACKOFF_FIRST_SECONDS
        # The next batch, claimed while this one's reports are written so the helper is not
        # idle meanwhile (measured: 21 % of a burst's worker time was model + writes).
        self._next: _Batch | None = None

    def run(self) -> None:
        try:
            self._run()
        finally:
            self._give_back_next_batch()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            self.wake.clear()
            batch, self._next = self._next, None
            if batch is None:
                try:
                    batch = self._claim()
                except Exception as error:  # the queue briefly unavailable: wait and retry
                    log.error("claim_failed", worker=self.name, error=str(error))
                    self.stop_event.wait(IDLE_POLL_SECONDS)
                    continue
            if batch is None:
                self.wake.wait(IDLE_POLL_SECONDS)
                continue
            try:
                with self.activity.busy() if self.activity else contextlib.nullcontext():
                    self._process_or_fail(batch)
            except HelperPoolStopped:
                return  # stopping: the batch stays `classifying`, start-up requeues it
            except Exception as error:
                if not is_temporary_storage_error(error):  # a bug must not kill the worker
                    log.exception("batch_unsettled", worker=self.name, error=str(error))
                    continue
                self._requeue_when_writable(batch.jobs, error)
            else:
                self._storage_backoff = STORAGE_BACKOFF_FIRST_SECONDS

    def _claim(self) -> _Batch | None:
        """Claim up to batch_size pending jobs and hand their images to the helper."""
        jobs = self.store.claim(self.config.workers.batch_size)
        if not jobs:
            return None
        try:
            prepared = self.helper_pool.start_prepare(
                [self.spool.resolve(job.image_file) for job in jobs], self.filters,
                self.config.limits.max_pixels, keep_for_report=True, heatmap=self.heatmaps)
        except Exception as error:  # settled with the batch, like any error while processing
            return _Batch(list(jobs), None, error)
        return _Batch(list(jobs), prepared)

    def _claim_next_batch(self) -> None:
        if self._next is not None or self.stop_event.is_set():
            return
        try:
            self._next = self._claim()
        except Exception as error:  # the main loop claims again later
            log.warning("claim_ahead_failed", worker=self.name, error=str(error))

    def _give_back_next_batch(self) -> None:
        """On the way out, a batch claimed ahead goes back to pending (start-up would do it
        too, but `pacs-ai status` should not show it classifying while the service is down)."""
        batch, self._next = self._next, None
        if batch is None:
            return
        try:
            self.store.requeue([job.id for job in batch.jobs])
        except Exception as error:
            log.warning("requeue_failed", worker=self.name, error=str(error))

    def _process_or_fail(self, batch: _Batch) -> None:
        """Process a batch; an unexpected error fails its jobs with the reason. A temporary
        storage error (full disk) propagates: the caller requeues the batch instead."""
        jobs = batch.jobs
        try:
            self._process_batch(batch)
        except Exception as error:
            if is_temporary_storage_error(error) or isinstance(error, HelperPoolStopped):
                raise
            log.exception("batch_failed", worker=self.name, error=str(error))
            for job in jobs:
                self._fail(job, Stage.CLASSIFY,
                           f"internal-error: {type(error).__name__}: {error}")

    def _requeue_when_writable(self, jobs: Sequence[Job], error: BaseException) -> None:
        """Back off, then put the batch's still-`classifying` jobs back to pending, retrying
        (with a growing, bounded delay) until the queue can be written. On shutdown they stay
        in `classifying` and start-up puts them back."""
        log.warning("storage_full_batch_requeued", worker=self.name, jobs=len(jobs),
                    error=str(error))
        job_ids = [job.id for job in jobs]
        while not self.stop_event.wait(self._storage_backoff):
            self._storage_backoff = min(self._storage_backoff * 2, STORAGE_BACKOFF_MAX_SECONDS)
            try:
                self.store.requeue(job_ids)
                return
            except Exception as requeue_error:
                log.warning("requeue_failed", worker=self.name, error=str(requeue_error))

    def _process_batch(self, batch: _Batch) -> None:
        """Classify and report one batch of claimed jobs."""
        if batch.error is not None or batch.prepared is None:
            raise batch.error or RuntimeError("batch without images")
        jobs = batch.jobs
        prepared = batch.prepared.results()
        ready: list[_Ready] = []
        for job, item in zip(jobs, prepared):
            if item.status == PrepareStatus.SKIPPED:
                self._skip(job, item.reason or "skipped")
            elif item.model_input is None:
                self._fail(job, Stage.CLASSIFY, item.reason or "error")
            else:
                # the image's own decode time, not its wait behind other work in the helper
                ready.append(_Ready(job, item.model_input, item.seconds, item.age_known,
                                    item.kept, item.age))
        if not ready:
            return
        started = time.perf_counter()
        model_input = np.stack([r.model_input for r in ready])
        try:
            probabilities, ood_scores, maps = self._assess(model_input)
        except Exception as error:
            for item in ready:
                self._fail(item.job, Stage.CLASSIFY,
                           f"model-failed: {type(error).__name__}: {error}")
            return
        inference_share = (time.perf_counter() - started) / len(ready)
        self._count_assessments(probabilities, ood_scores)
        self._settle(ready, probabilities, ood_scores, maps, inference_share)
        if self.shadow is not None:  # after the live reports, and without waiting for it
            self.shadow.submit(ShadowBatch(
                [r.job.id for r in ready], model_input,
                assessments(self.model, probabilities, ood_scores), [r.age for r in ready]))

    def _settle(self, ready: list[_Ready], probabilities: Sequence[float],
                ood_scores: Sequence[float] | None, maps: Sequence,
                inference_share: float) -> None:
        """The live model's outcome for each film: abstained (skipped), or reported."""
        if ood_scores is not None:
            # abstain on films unlike the training films: skipped with the score, no report
            kept = []
            for item, probability, score, grid in zip(ready, probabilities, ood_scores, maps):
                reason = self.model.abstain_reason(float(score))
                if reason:
                    # the model kept with the job: the queue page's abstention rate per model
                    self._skip(item.job, reason, model=self.model.info.label,
                               ood_score=round(float(score), 3), age_known=item.age_known)
                else:
                    kept.append((item, float(probability), grid))
            if not kept:
                return
            ready, probabilities = [k[0] for k in kept], [k[1] for k in kept]
            maps = [k[2] for k in kept]
        else:
            probabilities = [float(p) for p in probabilities]
        maps, heatmap_images = self._maps_wanted(probabilities, maps)
        rendering = self.helper_pool.start_render(
            [(self.spool.resolve(r.job.image_file), r.kept, p, grid, image)
             for r, p, grid, image in zip(ready, probabilities, maps, heatmap_images)],
            self.model.info, self.config.report.sr_kind)
        self._claim_next_batch()  # its images queue behind these reports in the helper
        reports = rendering.results()
        for item, probability, report in zip(ready, probabilities, reports):
            self._report(item, probability, report, item.prepare_seconds + inference_share)

    def _count_assessments(self, probabilities: Sequence[float],
                           ood_scores: Sequence[float] | None) -> None:
        """Each film the model assessed, in pacs_ai_model_results_total (its finding, or
        abstained) and pacs_ai_ood_score: what the drift alerts watch."""
        info = self.model.info
        for index, probability in enumerate(probabilities):
            score = None if ood_scores is None else float(ood_scores[index])
            result = (metrics.RESULT_ABSTAINED if self.model.abstain_reason(score)
                      else self.model.finding(float(probability)))
            metrics.count_assessment(info, metrics.ROLE_LIVE, result, score)

    def _assess(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list]:
        """(probabilities, out-of-distribution scores or None, a map grid or None per film).
        With a model that gives maps, one pass gives all three (pacs_ai.model.model); if its maps
        fail, the batch is assessed without them and its reports go without region and
        heat-map image."""
        if self.model.has_saliency:
            try:
                return self.model.assess_with_saliency(batch)
            except Exception as error:
                log.error("saliency_failed", worker=self.name, films=len(batch),
                          error=f"{type(error).__name__}: {error}")
        probabilities, ood_scores = self.model.assess(batch)
        return probabilities, ood_scores, [None] * len(batch)

    def _maps_wanted(self, probabilities: Sequence[float],
                     maps: Sequence) -> tuple[list, list[bool]]:
        """Per film: the map grid the report step gets (None: none), and whether to make the
        heat-map image. Films reported as pneumonia keep their map (their SR carries the
        region; the image when [report] heatmap); others only with heatmap_for_normal."""
        report = self.config.report
        kept, images = [], []
        for probability, grid in zip(probabilities, maps):
            pneumonia = self.model.finding(probability) == Finding.PNEUMONIA
            image = grid is not None and report.heatmap and (pneumonia or report.heatmap_for_normal)
            kept.append(grid if pneumonia or image else None)
            images.append(image)
        return kept, images

    def _skip(self, job: Job, reason: str, model: str | None = None, **fields: object) -> None:
        """`model`: the model that decided (an abstention), kept with the job."""
        self.store.mark_skipped(job.id, reason, model=model)
        metrics.SKIPPED.labels(reason=metrics.reason_code(reason)).inc()
        log.info("instance_skipped", sop_instance_uid=job.sop_instance_uid, reason=reason,
                 **({"model": model} if model else {}), **fields)
        self.on_job_finished(self._reload(job))

    def _report(self, item: _Ready, probability: float, report: RenderedReport,
                seconds: float) -> None:
        job = item.job
        if report.data is None or report.report_uid is None:
            self._fail(job, Stage.REPORT, report.error or "report-failed")
            return
        finding = self.model.finding(probability)
        report_uid = report.report_uid
        report_path = self.spool.report_path(report_uid)
        self.spool.write_durably(report_path, report.data)
        heatmap_file = None
        if report.heatmap_data is not None and report.heatmap_uid is not None:
            # in the outbox before the job says it has one: a crash in between leaves the job
            # `classifying`, redone at start-up with the same UIDs
            heatmap_path = self.spool.report_path(report.heatmap_uid)
            self.spool.write_durably(heatmap_path, report.heatmap_data)
            heatmap_file = self.spool.relative(heatmap_path)
        elif report.heatmap_error is not None:
            log.warning("heatmap_failed", sop_instance_uid=job.sop_instance_uid,
                        error=report.heatmap_error)
        route = choose_route(self.config, RouteFacts(
            job.calling_ae_title, job.peer_address, job.modality, job.station_name))
        state = self.store.mark_reported(
            job.id, probability=probability, finding=finding, report_uid=report_uid,
            report_file=self.spool.relative(report_path), classify_ms=seconds * 1000,
            destinations=route.destinations, route=route.name, model=self.model.info.label,
            heatmap_uid=report.heatmap_uid if heatmap_file else None, heatmap_file=heatmap_file,
            age_known=item.age_known,
            image_destinations=[d.name for d in self.config.destinations if d.takes_images])
        metrics.CLASSIFIED.labels(finding=finding).inc()
        if item.age_known is False:
            metrics.CLASSIFIED_WITHOUT_AGE.inc()
        metrics.CLASSIFY_SECONDS.observe(seconds)
        log.info("instance_classified", sop_instance_uid=job.sop_instance_uid,
                 study_instance_uid=job.study_instance_uid, report_uid=report_uid,
                 probability=round(probability, 6), finding=finding,
                 milliseconds=round(seconds * 1000, 1), model=self.model.info.label,
                 age_known=item.age_known, route=route.name,
                 destinations=list(route.destinations),
                 **({"heatmap_uid": report.heatmap_uid} if heatmap_file else {}))
        if state == JobState.DONE:
            self.on_job_finished(self._reload(job))

    def _fail(self, job: Job, stage: Stage, reason: str) -> None:
        try:
            changed = self.store.mark_failed(job.id, stage, reason)
        except Exception as error:
            if is_temporary_storage_error(error):  # the batch is requeued, not left claimed
                raise
            # left in `classifying`: start-up puts it back to pending
            log.error("mark_failed_failed", sop_instance_uid=job.sop_instance_uid,
                      error=str(error))
            return
        if not changed:  # already reported (or settled) earlier in this batch: keep that
            return
        metrics.FAILED.labels(stage=stage).inc()
        log.warning("instance_failed", sop_instance_uid=job.sop_instance_uid, stage=stage,
                    reason=reason)

    def _reload(self, job: Job) -> Job:
        return self.store.find(job.sop_instance_uid) or job
