"""`pacs-ai status`: jobs per state, backlog, deliveries and the latest failures with reasons.

Reads the job queue in the spool of the config (the service may be running meanwhile).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

HELP = "show jobs per state, the backlog, deliveries per destination and the latest failures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: ./spool)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--limit", type=int, default=10, metavar="N",
                        help="how many recent failures and skips to list (default 10)")


def _time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def collect(store: Any, limit: int) -> dict[str, Any]:
    def job_entry(job: Any) -> dict[str, Any]:
        return {"sop_instance_uid": job.sop_instance_uid, "stage": job.stage,
                "reason": job.reason, "at": _time(job.updated_at)}

    return {
        "jobs": store.job_counts(),
        "backlog": store.backlog(),
        "deliveries": store.delivery_counts(),
        "retrying": [{"report_uid": uid, "destination": name, "attempts": attempts,
                      "next_attempt_at": _time(next_at), "last_error": error}
                     for uid, name, attempts, next_at, error in store.retrying_deliveries(limit)],
        "failures": [job_entry(job) for job in store.latest_failures(limit)],
        "skipped": [job_entry(job) for job in store.latest_skips(limit)],
    }


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.jobs import JobStore
    from pacs_ai.spool import Spool

    config = load_config(args.config)
    spool = Spool(config.storage.spool_dir)
    store = JobStore.open(spool.db_path, create=False)
    try:
        report = {"spool": str(spool.root), **collect(store, max(args.limit, 0))}
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"spool:    {report['spool']}")
    print("jobs:     " + " | ".join(f"{state} {count}" for state, count in report["jobs"].items()))
    print(f"backlog:  {report['backlog']} (waiting for classification or delivery)")
    if report["deliveries"]:
        print("deliveries:")
        for name, counts in report["deliveries"].items():
            print(f"  {name}: " + "  ".join(f"{state} {n}" for state, n in counts.items()))
    for entry in report["retrying"]:
        print(f"  retrying {entry['report_uid']} to {entry['destination']}: attempt "
              f"{entry['attempts']} failed ({entry['last_error']}); next at "
              f"{entry['next_attempt_at']}")
    for title, key in (("latest failures", "failures"), ("latest skips", "skipped")):
        if report[key]:
            print(f"{title}:")
            for entry in report[key]:
                stage = f" [{entry['stage']}]" if entry["stage"] else ""
                print(f"  {entry['at']}  {entry['sop_instance_uid']}{stage}  {entry['reason']}")
    return 0
