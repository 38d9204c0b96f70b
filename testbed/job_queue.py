"""Reading a job queue whole, for tests: the service itself only ever reads bounded slices
(the latest jobs, counts), so a queue of a million jobs is never loaded at once."""

from __future__ import annotations

from pacs_ai.queue.job_records import Job
from pacs_ai.queue.jobs import JobStore


def all_jobs(store: JobStore) -> list[Job]:
    """Every job of the queue, oldest first."""
    return list(reversed(store.recent_jobs(-1)))  # SQLite: LIMIT -1 is no limit
