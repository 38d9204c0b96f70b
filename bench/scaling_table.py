"""The table of a bench/core_scaling.sh run: one row per core count and concurrency.

    python bench/scaling_table.py runs/scaling

For each core count: the bare pynetdicom receiver's acknowledged films/s, pacs-ai's fully
reported films/s, their ratio (issue 16's target on 4+ cores: at least 0.8), pacs-ai's latency
from acknowledgement to report at the PACS (median, p95), its CPU per film against the bare
receiver's, and the worker processes/threads the service chose.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def load(folder: Path) -> list[tuple[int, dict]]:
    runs = []
    for path in folder.glob("bench-*cores.json"):
        cores = int(re.search(r"bench-(\d+)cores", path.name).group(1))
        runs.append((cores, json.loads(path.read_text())))
    return sorted(runs, key=lambda item: item[0])


def workers(sized: dict | None) -> str | None:
    """What `[workers] = "auto"` chose, as run_bench.py records it."""
    if not sized:
        return None
    return f"{sized.get('count')} x {sized.get('processes')} ({sized.get('limited_by')})"


def rows(folder: Path) -> list[dict]:
    table = []
    for cores, result in load(folder):
        by_key = {(run["receiver"], run["associations"]): run for run in result["runs"]}
        for (receiver, associations), run in sorted(by_key.items()):
            if receiver != "pacs-ai":
                continue
            bare = by_key.get(("pynetdicom", associations), {})
            bare_rate = bare.get("images_per_second_received")
            reported_rate = run.get("images_per_second_reported")
            latency = run.get("latency_seconds") or {}
            table.append({
                "cores": cores, "associations": associations,
                "bare_received_per_s": bare_rate,
                "pacs_ai_received_per_s": run.get("images_per_second_received"),
                "pacs_ai_reported_per_s": reported_rate,
                "reported_over_bare": round(reported_rate / bare_rate, 2)
                if bare_rate and reported_rate else None,
                "latency_median_s": latency.get("median"), "latency_p95_s": latency.get("p95"),
                "cpu_ms_per_film_pacs_ai": run.get("cpu_ms_per_film"),
                "cpu_ms_per_film_bare": bare.get("cpu_ms_per_film"),
                "peak_rss_mb": run.get("service_peak_rss_mb"),
                "workers_x_helpers": workers(run.get("workers")),
                "reported": f"{run.get('reported')}/{run.get('acknowledged')}",
            })
    return table


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    table = rows(Path(argv[0]))
    if not table:
        print(f"no bench-<N>cores.json in {argv[0]}", file=sys.stderr)
        return 1
    columns = list(table[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
