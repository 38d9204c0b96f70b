"""`pacs-ai status`: jobs per state, backlog, the spool, deliveries and their health per
destination, classified films without a known patient age, the latest failures with reasons,
and what needs an admin.

Reads the job queue in the spool of the config (the service may be running meanwhile). Exit
status: 0 when nothing needs an admin; 1 when something does (failed jobs within [status]
failed_jobs_within_seconds, a destination failing for longer than [status]
destination_failing_seconds, the spool unwritable or below [storage] min_free_bytes, a listener
that no calling AE title may use yet), listed under "needs admin"; 2 when the status cannot be
read (a bad config, no queue yet). Failed jobs an admin dismissed (`pacs-ai dismiss`) are listed
as such and call for no one.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

from pacs_ai.commands.arguments import whole_number

HELP = ("show jobs per state, the backlog, deliveries per destination, the latest failures and "
        "what needs an admin (exit status 1 when something does)")
EXIT_NEEDS_ADMIN = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: ./spool)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--limit", type=whole_number(0), default=10, metavar="N",
                        help="how many retrying deliveries, recent failures and recent "
                             "skips to list (default 10 of each)")


def _time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def collect(store: Any, limit: int) -> dict[str, Any]:
    from pacs_ai.queue.job_records import DeliveryObject, reason_code, retry_can_fix

    def job_entry(job: Any) -> dict[str, Any]:
        return {"job": job.id, "sop_instance_uid": job.sop_instance_uid, "stage": job.stage,
                "reason": job.reason, "at": _time(job.updated_at), "route": job.route}

    def failure_entry(job: Any) -> dict[str, Any]:
        return {**job_entry(job),
                "retry_can_fix": retry_can_fix(job.stage, reason_code(job.reason)),
                "dismissed_at": _time(job.dismissed_at)}

    return {
        "jobs": store.job_counts(),
        "dismissed": store.dismissed_count(),  # of the failed jobs
        "backlog": store.backlog(),
        # reports per destination; heat-map images apart, so the counts stay one per film
        "deliveries": store.delivery_counts(DeliveryObject.REPORT),
        "heatmap_deliveries": store.delivery_counts(DeliveryObject.HEATMAP),
        "routes": store.route_counts(),
        # classified films by whether their header gave a usable patient age
        "classified_ages": store.age_counts(),
        "retrying": [{"report_uid": uid, "destination": name, "attempts": attempts,
                      "next_attempt_at": _time(next_at), "last_error": error}
                     for uid, name, attempts, next_at, error in store.retrying_deliveries(limit)],
        "retrying_total": store.retrying_count(),  # the list above stops at --limit
        "failures": [failure_entry(job) for job in store.latest_failures(limit)],
        "skipped": [job_entry(job) for job in store.latest_skips(limit)],
    }


def _bytes(count: int | None) -> str:
    if count is None:
        return "unknown"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    if value < 120:
        return f"{value} s"
    if value < 7200:
        return f"{value // 60} min"
    return f"{value // 3600} h {value % 3600 // 60} min"


def _ages_line(ages: dict[str, int], unknown_age: str) -> str:
    classified = sum(ages.values())
    line = (f"no age:   {ages['unknown']} of {classified} classified films had no usable "
            f'patient age ([model] unknown_age = "{unknown_age}")')
    if ages["not_recorded"]:
        line += f"; {ages['not_recorded']} classified before pacs-ai recorded it"
    return line


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.ops import health
    from pacs_ai.queue.jobs import JobStore
    from pacs_ai.queue.spool import Spool

    config = load_config(args.config)
    spool = Spool(config.storage.spool_dir)
    store = JobStore.open(spool.db_path, create=False)
    try:
        spool_state = health.spool_state(spool, config.storage.min_free_bytes)
        destinations = health.destinations_state(store, config)
        report = {"spool": str(spool.root), **collect(store, args.limit),
                  "spool_free_bytes": spool_state["free_bytes"],
                  "min_free_bytes": spool_state["min_free_bytes"],
                  "spool_writable": spool_state["writable"],
                  "destinations": destinations,
                  "unknown_age": config.model.unknown_age,
                  "needs_admin": health.needs_admin(config, store, destinations, spool_state)}
    finally:
        store.close()
    status = EXIT_NEEDS_ADMIN if report["needs_admin"] else 0
    if args.json:
        print(json.dumps(report, indent=2))
        return status
    print(f"spool:    {report['spool']} ({_bytes(report['spool_free_bytes'])} free, floor "
          f"{_bytes(report['min_free_bytes'])}"
          f"{'' if report['spool_writable'] else ', NOT WRITABLE'})")
    print("jobs:     " + " | ".join(f"{state} {count}" for state, count in report["jobs"].items())
          + (f" ({report['dismissed']} dismissed)" if report["dismissed"] else ""))
    print(f"backlog:  {report['backlog']} (waiting for classification or delivery)")
    print(_ages_line(report["classified_ages"], report["unknown_age"]))
    if report["routes"]:
        print("routes:   " + " | ".join(f"{name} {count}"
                                        for name, count in report["routes"].items())
              + " (reports queued by the route they took)")
    if report["deliveries"] or destinations:
        print("deliveries:")
        for name in dict.fromkeys([*destinations, *report["deliveries"]]):
            counts = report["deliveries"].get(name, {})
            print(f"  {name}: reports " + "  ".join(f"{state} {n}" for state, n in counts.items()))
            images = report["heatmap_deliveries"].get(name)
            if images:
                print("    heat-map images " + "  ".join(f"{state} {n}"
                                                    for state, n in images.items()))
            state = destinations.get(name)
            if state is None:
                continue  # no longer in the config
            print(f"    health {state['health']}"
                  + (f": {state['health_detail']}" if state["health_detail"] else ""))
            line = f"    last success {state['last_success_at'] or 'never'}"
            if state["pending"]:
                line += f", oldest waiting {_seconds(state['oldest_pending_seconds'])}"
            print(line)
            if state["failing_since"]:
                print(f"    failing for {_seconds(state['failing_seconds'])} (since "
                      f"{state['failing_since']}): {state['last_error']}")
            echo = state.get("echo")
            if echo is not None:
                outcome = {True: "ok", False: "FAILED", None: "not yet"}[echo["ok"]]
                print(f"    echo {outcome}" + (f" at {echo['at']}" if echo["at"] else "")
                      + (f": {echo['detail']}" if echo["ok"] is False else ""))
    for entry in report["retrying"]:
        print(f"  retrying {entry['report_uid']} to {entry['destination']}: attempt "
              f"{entry['attempts']} failed ({entry['last_error']}); next at "
              f"{entry['next_attempt_at']}")
    unlisted = report["retrying_total"] - len(report["retrying"])
    if unlisted > 0:
        print(f"  ... and {unlisted} more retrying (`pacs-ai status --limit N` lists more)")
    for title, key in (("latest failures", "failures"), ("latest skips", "skipped")):
        if report[key]:
            print(f"{title}:")
            for entry in report[key]:
                stage = f" [{entry['stage']}]" if entry["stage"] else ""
                stage += f" route {entry['route']}" if entry["route"] else ""
                seen = (f"  (dismissed {entry['dismissed_at']})"
                        if entry.get("dismissed_at") else "")
                print(f"  {entry['at']}  {entry['sop_instance_uid']}{stage}  {entry['reason']}"
                      f"{seen}")
    if report["needs_admin"]:
        print("needs admin:")
        for reason in report["needs_admin"]:
            print(f"  {reason}")
    return status
