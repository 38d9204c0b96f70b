"""Summarise a py-spy raw profile of a bench run: busy seconds per process and thread kind,
and where inside pacs_ai they went. Used for docs/benchmarks.md:

    .venv/bin/pip install py-spy
    .venv/bin/py-spy record --subprocesses --idle -r 100 -f raw -o runs/bench/profile.txt -- \
        .venv/bin/python bench/run_bench.py --images 40 --concurrency 1 --receivers pacs-ai
    .venv/bin/python bench/profile_summary.py runs/bench/profile.txt [depth] [rate]

`rate` is py-spy's `-r` (samples per second, default 100). With `--gil` instead of `--idle`,
py-spy samples only the thread holding each process's interpreter lock: the busy seconds are
then the lock time per thread. Samples whose innermost frame is a wait (lock, select,
queue, sleep) count as idle. py-spy shows pynetdicom's 1 ms polling sleeps as the polling
function itself, so association threads look busier than they are.
"""

from __future__ import annotations

import collections
import re
import sys

IDLE_LEAVES = ("Condition.wait", "select (", "recv (", "Queue.get", "poll (", "sleep",
               "_wait_for_tstate_lock", "accept (", "_recv (", "_recv_bytes", "readinto",
               "serve_forever", "Event.wait", "_read_pdu", "Connection.recv",
               "resource_tracker")  # the tracker only waits on its pipe
THREAD_MARKERS = (("_process_worker", "helper"), ("Association.run", "association"),
                  ("DULServiceProvider", "association"), ("serve_forever", "accept"))


PROCESS = re.compile(r'process \d+:"[^"]*";?')  # a command line may itself hold ';'


def process_kind(processes: list[str]) -> str:
    if len(processes) == 1:
        return "bench"
    last = processes[-1]
    return ("service" if "pacs_ai serve" in last else
            "helper" if "multiprocessing" in last else last[:60])


def thread_kind(frames: list[str]) -> str:
    for frame in frames:
        for marker, kind in THREAD_MARKERS:
            if marker in frame:
                return kind
        match = re.match(r"(\w+)\.run \(pacs_ai", frame)
        if match:
            return match.group(1)
    return "main"


def main(path: str, depth: int = 2, rate: int = 100) -> None:
    groups: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter)
    busy: collections.Counter = collections.Counter()
    idle: collections.Counter = collections.Counter()
    for line in open(path).read().splitlines():
        stack_text, count_text = line.rsplit(" ", 1)
        samples = int(count_text)
        processes = PROCESS.findall(stack_text)
        frames = [frame for frame in PROCESS.sub("", stack_text).split(";") if frame]
        key = (process_kind(processes), thread_kind(frames))
        leaf = frames[-1] if frames else ""
        if any(marker in leaf for marker in IDLE_LEAVES):
            idle[key] += samples
            continue
        busy[key] += samples
        ours = [frame for frame in frames if "pacs_ai/" in frame and ".run (" not in frame]
        label = " > ".join(frame.split(" (")[0] for frame in (ours[-depth:] or frames[-2:]))
        groups[key][label] += samples
    for key in sorted(busy, key=lambda k: -busy[k]):
        print(f"== {key[0]} / {key[1]}: busy {busy[key] / rate:.2f} s, "
              f"idle {idle[key] / rate:.2f} s")
        for label, samples in groups[key].most_common(8):
            print(f"   {samples / rate:6.2f} s  {label}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2,
         int(sys.argv[3]) if len(sys.argv) > 3 else 100)
