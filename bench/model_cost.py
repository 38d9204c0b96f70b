"""What a model file's pass costs per film: CPU milliseconds of `assess` (probabilities and the
out-of-distribution score) and of `assess_with_saliency` (the same with the heat map's map,
the service's pass when heat maps are on), at batch 1 and 4, with one torch thread as the
service's default worker runs. Several files are measured in one run, interleaved, so they
share the machine's state.

    .venv/bin/python bench/model_cost.py [--models FILE...] [--repeats R]

CPU time is `time.process_time` (this process, every thread), the median over the repeats of
one call on the same random inputs, divided by the batch. Prints one JSON object per file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pacs_ai.config import default_model_path  # noqa: E402
from pacs_ai.model.model import PneumoniaModel  # noqa: E402


def per_film_ms(call, batch: np.ndarray, repeats: int) -> float:
    call(batch)  # warm-up: TorchScript optimises on the first calls
    call(batch)
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        call(batch)
        samples.append(time.process_time() - started)
    return 1000 * statistics.median(samples) / len(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", default=[default_model_path()])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    models = [PneumoniaModel.load(path) for path in args.models]
    inputs = np.random.default_rng(0).random((4, 1, 200, 200), dtype=np.float32)
    figures = {model.info.label: {"file": str(model.path),
                                  "bytes": model.path.stat().st_size} for model in models}
    for batch_size in (1, 4):
        batch = inputs[:batch_size]
        for model in models:  # interleaved: every file sees the same load
            row = figures[model.info.label]
            row[f"assess_ms_batch{batch_size}"] = round(per_film_ms(
                model.assess, batch, args.repeats), 2)
            if model.has_saliency:
                row[f"assess_with_saliency_ms_batch{batch_size}"] = round(per_film_ms(
                    model.assess_with_saliency, batch, args.repeats), 2)
    for label, row in figures.items():
        print(json.dumps({"model": label, **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
