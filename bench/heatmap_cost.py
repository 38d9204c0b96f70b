"""What the saliency map and the heat-map image add per reported film (issue 15): CPU time and
the render step's peak Python-heap allocation, measured on the shipped model.

    .venv/bin/python bench/heatmap_cost.py [--synthetic N] [--repeats R]

Per film (the pneumonia sample DICOMs, plus N synthetic 2500x2048 DX films from
runs/bench-cache/ as bench/run_bench.py makes them), with one torch thread as the service's
default worker runs:
- map: what the worker's one pass with maps (`PneumoniaModel.assess_with_saliency`) costs more
  than the pass without (`assess`), on the film alone; it is paid for every classified film;
- report: `pacs_ai.classify.helper_processes.render_report` as the helper runs it, without a map (the SR as
  before) and with it (SR with the TID 1410 region + the heat-map Secondary Capture, which
  decodes the film again). Added = with - without.
CPU time is `time.process_time` (this process, all threads), median over the repeats; memory is
tracemalloc's peak during one render (numpy's buffers included, torch's not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pacs_ai.classify.helper_processes import render_report  # noqa: E402
from pacs_ai.film.pixels import display_array  # noqa: E402
from pacs_ai.model.model import PneumoniaModel  # noqa: E402
from pacs_ai.model.preprocessing import to_model_input  # noqa: E402


def films(synthetic: int) -> list[Path]:
    manifest = json.loads((ROOT / "sample_dicoms" / "manifest.json").read_text())["files"]
    paths = [ROOT / "sample_dicoms" / e["file"] for e in manifest
             if e["expected_status"] == "ok" and "pneumonia" in e["file"]]
    if synthetic:
        from testbed.dicom_peers import synthetic_radiograph

        cache = ROOT / "runs" / "bench-cache"
        cache.mkdir(parents=True, exist_ok=True)
        for index in range(synthetic):
            path = cache / f"heatmap-dx-{index}.dcm"
            if not path.is_file():
                synthetic_radiograph(seed=5000 + index, rows=2500, columns=2048).save_as(
                    path, enforce_file_format=True)
            paths.append(path)
    return paths


def cpu_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def peak_mb(function) -> float:
    tracemalloc.start()
    function()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = PneumoniaModel.load()
    info = model.info
    rows = []
    for path in films(args.synthetic):
        source = pydicom.dcmread(path)
        model_input = to_model_input(display_array(source))[np.newaxis]
        probability = max(float(model.predict(model_input)[0]), info.threshold)  # as reported
        grid = model.saliency(model_input)[0]
        model.saliency(model_input)  # warm
        render_report(path, probability, info, "comprehensive3d", grid, True)  # warm

        def plain():
            return render_report(path, probability, info, "comprehensive3d")

        def with_map():
            return render_report(path, probability, info, "comprehensive3d", grid, True)

        result = with_map()
        assert result.heatmap_data is not None, result.heatmap_error
        row = {"film": path.name, "pixels": f"{source.Rows}x{source.Columns}",
               "syntax": str(source.file_meta.TransferSyntaxUID.name),
               "map_ms": cpu_ms(lambda: model.assess_with_saliency(model_input), args.repeats)
               - cpu_ms(lambda: model.assess(model_input), args.repeats),
               "report_ms": cpu_ms(plain, args.repeats),
               "report_with_map_ms": cpu_ms(with_map, args.repeats),
               "report_peak_mb": peak_mb(plain), "report_with_map_peak_mb": peak_mb(with_map),
               "heatmap_bytes": len(result.heatmap_data)}
        row["added_ms"] = row["map_ms"] + row["report_with_map_ms"] - row["report_ms"]
        rows.append(row)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                          for k, v in row.items()}), flush=True)
    added = [r["added_ms"] for r in rows]
    print(json.dumps({"films": len(rows), "median_added_ms": round(statistics.median(added), 1),
                      "max_added_ms": round(max(added), 1),
                      "median_map_ms": round(statistics.median(r["map_ms"] for r in rows), 1),
                      "max_added_peak_mb": round(max(r["report_with_map_peak_mb"]
                                                     - r["report_peak_mb"] for r in rows), 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
