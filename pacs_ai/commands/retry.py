"""`pacs-ai retry`: requeue failed jobs (classification and delivery failures).

A running service picks them up within a second; otherwise they run at the next start.
"""

from __future__ import annotations

import argparse

HELP = "requeue failed jobs: failed classifications and failed deliveries are tried again"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: ./spool)")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.queue.jobs import JobStore
    from pacs_ai.queue.spool import Spool

    config = load_config(args.config)
    store = JobStore.open(Spool(config.storage.spool_dir).db_path, create=False)
    try:
        jobs, deliveries = store.requeue_failed()
    finally:
        store.close()
    print(f"requeued {jobs} failed job(s); {deliveries} delivery(ies) will be tried again")
    return 0
