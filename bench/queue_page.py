"""What the queue page (/queue, /api/queue) costs on a large job queue: a scratch jobs.sqlite with
N jobs received over the last --days days (each reported, delivered to two destinations, every
20th failed on one of them; every 50th abstained on instead), then the median and worst wall
time of building the page's content and of serving /queue and /api/queue over HTTP from the
metrics server, as the service does at each (auto-)refresh. The page's drift chart reads every
job of its window ([drift] days, 28), so all N are in it by default.

    .venv/bin/python bench/queue_page.py                 # 10 000 and 100 000 jobs
    .venv/bin/python bench/queue_page.py --jobs 1000 --repeats 50
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacs_ai.config import Config, Destination  # noqa: E402
from pacs_ai.ops import http_server  # noqa: E402
from pacs_ai.ops.web import QueuePage  # noqa: E402
from pacs_ai.queue.jobs import JobStore  # noqa: E402

CR = "1.2.840.10008.5.1.4.1.1.1"
DESTINATIONS = ("pacs", "archive")


def fill(path: Path, count: int, days: float) -> None:
    """Rows written directly (one transaction): what the service would have after `count`
    films received evenly over `days` days, without running it."""
    import sqlite3

    JobStore.open(path).close()  # the schema
    db = sqlite3.connect(path)
    spacing = days * 86400 / count
    start = time.time() - days * 86400

    def at(n: int) -> float:
        return start + n * spacing

    with db:
        db.executemany(
            "INSERT INTO jobs (id, sop_instance_uid, sop_class_uid, study_instance_uid, "
            "calling_ae_title, image_file, state, stage, reason, probability, finding, "
            "report_uid, report_file, classify_ms, received_at, updated_at, peer_address, "
            "modality, station_name, accession_number, route, model) VALUES "
            "(?, ?, ?, ?, 'CR1', ?, ?, ?, ?, 0.7, 'pneumonia', ?, ?, 40, ?, ?, '10.0.0.5', 'CR', "
            "'ROOM1', ?, 'default', 'pacs-ai-pneumonia 1.2.0')",
            [(n, f"1.2.826.0.1.{n}", CR, f"1.2.826.0.2.{n}", f"images/{n}.dcm",
              "failed" if n % 20 == 0 else "done", "deliver" if n % 20 == 0 else None,
              "delivery to archive failed: connection-failed" if n % 20 == 0 else None,
              f"2.25.{n}", f"outbox/{n}.dcm", at(n), at(n), f"ACC{n}")
             for n in range(1, count + 1)])
        db.execute("UPDATE jobs SET state = 'skipped', stage = NULL, probability = NULL, "
                   "finding = NULL, report_file = NULL, reason = 'out-of-distribution: score "
                   "3.10 above 2.05; the film is unlike those the model was trained on' "
                   "WHERE id % 50 = 7")
        db.executemany(
            "INSERT INTO deliveries (job_id, destination, state, attempts, next_attempt_at, "
            "first_attempt_at, last_error, delivered_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?)",
            [(n, name, "failed" if (n % 20 == 0 and name == "archive") else "done", at(n),
              at(n), "connection-failed: ARCHIVE@10.0.0.9:104"
              if (n % 20 == 0 and name == "archive") else None, at(n))
             for n in range(1, count + 1) for name in DESTINATIONS if n % 50 != 7])
    db.close()


def timed(action, repeats: int) -> tuple[float, float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000, max(seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--days", type=float, default=27.5,
                        help="the films arrive over this many days (default: the chart's window)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    config = Config(destinations=tuple(Destination(name, name.upper(), "10.0.0.9", 104)
                                       for name in DESTINATIONS))
    print(f"{'jobs':>8} {'snapshot ms':>16} {'GET /queue ms':>16} {'GET /api/queue ms':>18}"
          f" {'page kB':>8}   (median / max of {args.repeats})")
    for count in args.jobs:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "jobs.sqlite"
            fill(path, count, args.days)
            store = JobStore.open(path)
            page = QueuePage(config, store, "pacs-ai-pneumonia 1.2.0")
            server = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True},
                                                  web=page)
            try:
                def fetch(url: str) -> bytes:
                    with urllib.request.urlopen(url, timeout=30) as response:
                        return response.read()
                snapshot = timed(page.snapshot, args.repeats)
                html = timed(lambda: fetch(server.url + "/queue"), args.repeats)
                api = timed(lambda: fetch(server.url + "/api/queue"), args.repeats)
                size = len(fetch(server.url + "/queue")) / 1000
            finally:
                server.shutdown()
                store.close()
        print(f"{count:>8} {snapshot[0]:>8.1f} / {snapshot[1]:<6.1f} {html[0]:>8.1f} / "
              f"{html[1]:<6.1f} {api[0]:>9.1f} / {api[1]:<6.1f} {size:>8.1f}")


if __name__ == "__main__":
    main()
