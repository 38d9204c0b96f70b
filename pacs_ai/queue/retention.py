"""Which files a job keeps in the spool, and for how long ([storage] keep_source_images,
keep_reports, keep_failed_days).

When a job ends `done` or `skipped` its image is deleted (unless keep_source_images); a `done`
job's report and heat-map images too (unless keep_reports). Failed jobs keep everything, so
`pacs-ai retry` can run them again, for keep_failed_days; then, like the kept images of
skipped jobs, their files go in an hourly purge. The rows stay (with an empty image_file and
no report_file: JobStore.purge_files).
"""

from __future__ import annotations

import threading
import time

import structlog

from pacs_ai.config import StorageConfig
from pacs_ai.queue.jobs import Job, JobState, JobStore
from pacs_ai.queue.spool import Spool

log = structlog.get_logger()

PURGE_INTERVAL_SECONDS = 3600.0  # how often files past [storage] keep_failed_days are purged


class FileRetention:
    def __init__(self, spool: Spool, store: JobStore, storage: StorageConfig):
        self.spool = spool
        self.store = store
        self.storage = storage

    def job_finished(self, job: Job) -> None:
        """A job reached done or skipped (or failed): drop the files not asked to be kept.
        Failed jobs keep everything so `pacs-ai retry` can run them again.

        Workers and senders call this once they are done with the job's files, not the job
        store at the state change: the sender's audit record of a delivery reads the report
        (study, SOP class, patient) after the queue has recorded it, and the store does not
        know the spool."""
        if job.state in (JobState.DONE, JobState.SKIPPED) and not self.storage.keep_source_images:
            self.spool.remove(job.image_file)
        if job.state == JobState.DONE and not self.storage.keep_reports:
            self.spool.remove(job.report_file)
            for heatmap_file in self.store.heatmap_files(job.id):  # its heat-map image
                self.spool.remove(heatmap_file)

    def purge_expired(self, now: float | None = None) -> int:
        """Delete the image and report files of jobs that failed or were skipped more than
        [storage] keep_failed_days ago (a hostile or broken file is not kept for ever); their
        rows stay. Returns the number of jobs purged."""
        days = self.storage.keep_failed_days
        if days <= 0:
            return 0
        purged = self.store.purge_files((time.time() if now is None else now) - days * 86400)
        if not purged:
            return 0
        freed = 0
        for job in purged:
            for relative in job.files:
                path = self.spool.resolve(relative)
                try:
                    freed += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    pass
        states = {state: sum(1 for job in purged if job.state == state)
                  for state in (JobState.FAILED, JobState.SKIPPED)}
        log.info("failed_files_purged", jobs=len(purged), failed=states[JobState.FAILED],
                 skipped=states[JobState.SKIPPED], bytes=freed, keep_failed_days=days,
                 sop_instance_uids=[job.sop_instance_uid for job in purged[:20]])
        return len(purged)

    def purge_periodically(self, stop: threading.Event) -> None:
        """purge_expired now and every PURGE_INTERVAL_SECONDS until `stop` is set."""
        while not stop.is_set():
            try:
                self.purge_expired()
            except Exception as error:  # a locked database, a file system error: next time
                log.exception("purge_failed", error=str(error))
            stop.wait(PURGE_INTERVAL_SECONDS)
