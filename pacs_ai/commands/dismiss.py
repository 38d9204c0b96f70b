"""`pacs-ai dismiss`: dismiss failed jobs an admin has seen, for failures no retry can fix.

A film whose failure is in the image itself (`too-large`, `decode-failed`, ...) fails the same
way however often `pacs-ai retry` runs it. Dismissed, the job stays failed with its reason
(listed as dismissed by `pacs-ai status` and the queue page), no longer makes `status` call
for an admin, and `retry` leaves it alone; a re-send of the image runs it again.
"""

from __future__ import annotations

import argparse

HELP = ("dismiss failed jobs an admin has seen (a failure no retry can fix): they stay listed, "
        "and status no longer calls for an admin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: ./spool)")
    parser.add_argument("jobs", nargs="*", metavar="JOB",
                        help="a failed job: its SOP Instance UID (as `pacs-ai status` lists it) "
                             "or its number (`job` on the queue page)")
    parser.add_argument("--all", action="store_true",
                        help="every failed job not dismissed yet")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.errors import UserError
    from pacs_ai.queue.jobs import JobStore
    from pacs_ai.queue.spool import Spool

    if bool(args.jobs) == args.all:
        raise UserError("name the failed jobs to dismiss (SOP Instance UIDs or job numbers), "
                        "or give --all")
    config = load_config(args.config)
    store = JobStore.open(Spool(config.storage.spool_dir).db_path, create=False)
    try:
        dismissed, unknown = store.dismiss(None if args.all else args.jobs)
    finally:
        store.close()
    if unknown:
        raise UserError(f"no failed job {', '.join(unknown)}; nothing was dismissed "
                        "(`pacs-ai status` lists the failures)")
    for job in dismissed:
        print(f"dismissed job {job.id} {job.sop_instance_uid} [{job.stage}] {job.reason}")
    print(f"dismissed {len(dismissed)} failed job(s)")
    return 0
