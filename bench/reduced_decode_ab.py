"""CPU of `pacs_ai.film.film_input.prepare` per file with the reduced decode (issue 16) and at full size,
in one process, alternating, so both see the same machine load.

    .venv/bin/python bench/reduced_decode_ab.py [--repeats 9]

Files: every sample_dicoms/ file the manifest expects to be classified (each transfer syntax)
and one bench film (runs/bench-cache, made by bench/run_bench.py). Prints the median CPU
milliseconds (time.process_time) of each path and the mean absolute difference of the two model
inputs. Full size is `DECODE_MIN_SIZE = None`, the path before issue 16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402

import pacs_ai.film.film_input as film_input  # noqa: E402
from pacs_ai.config import FilterPolicy  # noqa: E402

SAMPLES = REPO_ROOT / "sample_dicoms"
BENCH_FILM = REPO_ROOT / "runs" / "bench-cache" / "dx_2500x2048_0000.dcm"


def files() -> list[Path]:
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    paths = [SAMPLES / e["file"] for e in manifest["files"] if e["expected_status"] == "ok"]
    return paths + ([BENCH_FILM] if BENCH_FILM.exists() else [])


def prepare(path: Path, min_size: int | None):
    film_input.DECODE_MIN_SIZE = min_size
    started = time.process_time()
    prepared = film_input.prepare(path, FilterPolicy(), 50_000_000)
    return prepared, time.process_time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    reduced = film_input.DECODE_MIN_SIZE
    print(f"{'file':<48} {'transfer syntax':<34} {'full ms':>8} {'reduced':>8} {'MAD':>7}")
    for path in files():
        seconds: dict[int | None, list[float]] = {None: [], reduced: []}
        inputs = {}
        for _ in range(args.repeats):
            for size in (None, reduced):
                prepared, spent = prepare(path, size)
                seconds[size].append(spent)
                inputs[size] = prepared.model_input
        difference = float(np.abs(inputs[None] - inputs[reduced]).mean())
        syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        print(f"{path.name:<48} {syntax[:34]:<34} "
              f"{1000 * statistics.median(seconds[None]):>8.1f} "
              f"{1000 * statistics.median(seconds[reduced]):>8.1f} {difference:>7.4f}")
    film_input.DECODE_MIN_SIZE = reduced
    return 0


if __name__ == "__main__":
    sys.exit(main())
