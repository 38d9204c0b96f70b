"""CPU per film of each step of the pipeline, one step at a time (issue 25 items 2 and 5).

For two sets of films (synthetic 2500x2048 12-bit DX films, about 10 MB each, as
bench/run_bench.py makes them, and the sample DICOMs the manifest expects to be reported):

- receive: DCMTK storescu sends the set in one association to the service's listener
  (pacs_ai.receive.scp.StorageSCP, testbed.listener, in this process): PDUs, header checks, the spool
  write with its fsyncs and the queue row. The bare pynetdicom receiver of run_bench.py
  (writing each film's bytes to disk) beside it, the same way;
- write to spool: Spool.stage + commit (fsync of the file and the folder) of each film's bytes,
  already counted in "receive";
- read + decode: pydicom.dcmread, the header checks and the (reduced) decode of the stored values
  (pacs_ai.film.pixels.decode_for_display), once per film, as the helper does;
- preprocess: the display picture from those values and the one preprocessing function;
- model: the shipped model's one pass with maps (assess_with_saliency) at batch 4 (the
  service's batch size), divided by 4; as many torch threads as the service would use here
  (pacs_ai.classify.capacity.model_threads);
- report build: the checked header copied from the dataset as read, the SR built from it and
  encoded (source_header, build_report_from_header, save_as), as the helper does;
- heat-map image: the film's picture drawn from the decode above (read and decoded again only
  where the codec decoded too coarse for it, as the helper does), the Secondary Capture with
  the model's map, encoded; every film gets one here;
- send: the SR and the heat-map image sent as stored over one association to DCMTK storescp.

CPU is this process's (all threads; storescu and storescp are other processes), median of the
repeats, per film. Figures to read, not pass/fail checks.

    .venv/bin/python bench/step_costs.py [--synthetic 10] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402
from run_bench import MODEL_PATH, BareStorageScp, sample_files, synthetic_files  # noqa: E402

from pacs_ai.film.pixels import decode_for_display, display_from_decoded  # noqa: E402
from pacs_ai.model.heatmap import normalised  # noqa: E402
from pacs_ai.model.model import PneumoniaModel  # noqa: E402
from pacs_ai.model.preprocessing import DECODE_MIN_SIZE, to_model_input  # noqa: E402
from pacs_ai.queue.spool import Spool  # noqa: E402
from pacs_ai.report.heatmap_image import build_heatmap_image, picture_film  # noqa: E402
from pacs_ai.report.report import build_report_from_header, source_header  # noqa: E402
from testbed.dicom_peers import free_port  # noqa: E402
from testbed.listener import Listener  # noqa: E402
from testbed.real_peers import (propose_as_stored, stop_process, storescu,  # noqa: E402
                                wait_for_port)

BATCH = 4


def cpu() -> float:
    return time.process_time()


def per_film(function, items: list, repeats: int) -> float:
    """Median over the repeats of the CPU ms per item of `function` over all items."""
    runs = []
    for _ in range(repeats):
        started = cpu()
        for item in items:
            function(item)
        runs.append(1000 * (cpu() - started) / len(items))
    return statistics.median(runs)


def receive_costs(films: list[Path], repeats: int, work: Path) -> dict[str, float]:
    """CPU ms per film received by the service's listener and by the bare pynetdicom SCP."""
    profile = propose_as_stored(films, work / "as-stored.cfg")
    listener_runs, bare_runs = [], []
    for repeat in range(repeats):
        folder = work / f"listener-{repeat}"
        folder.mkdir()
        listener = Listener(folder, audited=True)
        try:
            started = cpu()
            run = storescu(listener.port, films, called_ae=listener.config.listener.ae_title,
                          extra=profile)
            listener_runs.append(1000 * (cpu() - started) / len(films))
            assert len(run.acknowledged) == len(films), run.output[-2000:]
        finally:
            listener.close()
        shutil.rmtree(folder)
        out = work / f"bare-{repeat}"
        out.mkdir()
        scp = BareStorageScp(out).start()
        try:
            started = cpu()
            run = storescu(scp.port, films, called_ae="BARE_SCP", extra=profile)
            bare_runs.append(1000 * (cpu() - started) / len(films))
            assert len(run.acknowledged) == len(films), run.output[-2000:]
        finally:
            scp.stop()
        shutil.rmtree(out)
    return {"receive (listener: PDUs, checks, spool write, queue row)":
            statistics.median(listener_runs),
            "bare pynetdicom receiver (for the ratio)": statistics.median(bare_runs)}


def spool_cost(films: list[Path], repeats: int, work: Path) -> float:
    spool = Spool(work / "spool")
    spool.prepare()
    contents = [path.read_bytes() for path in films]
    counter = iter(range(10 ** 9))

    def write(data: bytes) -> None:
        staged = spool.stage(data)
        spool.commit(staged, spool.images / f"{next(counter)}.dcm")

    return per_film(write, contents, repeats)


def send_cost(objects: list[Path], repeats: int, work: Path, films: int) -> float:
    """CPU ms per film of sending `objects` (the films' SRs and heat-map images) as stored."""
    from pynetdicom import AE

    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen([shutil.which("storescp") or "storescp", "-aet", "PACS", "+xa",
                                "-od", str(out), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=process, what="storescp")
        datasets = [pydicom.dcmread(path) for path in objects]
        ae = AE(ae_title="PACS_AI")
        for dataset in datasets:
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        runs = []
        for _ in range(repeats):
            started = cpu()
            association = ae.associate("127.0.0.1", port, ae_title="PACS")
            assert association.is_established
            for path in objects:
                status = association.send_c_store(path)  # as stored, as the sender does
                assert status.Status == 0, status
            association.release()
            runs.append(1000 * (cpu() - started) / films)
    finally:
        stop_process(process)
    return statistics.median(runs)


def film_costs(films: list[Path], model: PneumoniaModel, repeats: int,
               work: Path) -> dict[str, float]:
    read: dict[Path, tuple] = {}

    def read_and_decode(path: Path) -> None:
        dataset = pydicom.dcmread(path)
        read[path] = (dataset, decode_for_display(dataset, min_size=DECODE_MIN_SIZE))

    figures = {"read + decode": per_film(read_and_decode, films, repeats)}
    inputs: dict[Path, np.ndarray] = {}

    def preprocess(path: Path) -> None:
        dataset, decoded = read[path]
        picture = display_from_decoded(dataset, decoded, DECODE_MIN_SIZE)
        inputs[path] = to_model_input(picture.values, picture.box)

    figures["preprocess"] = per_film(preprocess, films, repeats)
    batches = [np.stack([inputs[path] for path in films[start:start + BATCH]])
               for start in range(0, len(films), BATCH)]
    grids: dict[Path, np.ndarray] = {}

    def assess(index: int) -> None:
        _, _, maps = model.assess_with_saliency(batches[index])
        for path, grid in zip(films[index * BATCH:(index + 1) * BATCH], maps):
            grids[path] = grid if grid is not None else normalised(np.ones((12, 12), np.float32))

    model_ms = per_film(assess, list(range(len(batches))), repeats)
    figures[f"model (batch {BATCH}, with maps)"] = model_ms * len(batches) / len(films)
    info = model.info
    written: list[Path] = []
    headers = {path: source_header(read[path][0]) for path in films}

    def report(path: Path) -> None:
        sr = build_report_from_header(source_header(read[path][0]), 0.9, info)
        encoded = io.BytesIO()
        sr.save_as(encoded, enforce_file_format=True)
        if len(written) < len(films):
            target = work / f"sr-{len(written)}.dcm"
            target.write_bytes(encoded.getvalue())
            written.append(target)

    figures["report build (header copy, SR, encoded)"] = per_film(report, films, repeats)
    heatmaps: list[Path] = []

    def heatmap_image(path: Path) -> None:
        film = picture_film(*read[path])  # from the model input's decode, as the helper keeps it
        if film is None:  # the codec decodes finer for the picture: read and decoded again
            film = picture_film(pydicom.dcmread(path))
        image = build_heatmap_image(headers[path], None, grids[path], None, 0.9, info,
                                    film=film)
        encoded = io.BytesIO()
        image.save_as(encoded, enforce_file_format=True)
        if len(heatmaps) < len(films):
            target = work / f"heatmap-{len(heatmaps)}.dcm"
            target.write_bytes(encoded.getvalue())
            heatmaps.append(target)

    figures["heat-map image (picture from the decode, SC, encoded)"] = per_film(heatmap_image, films, repeats)
    figures["send (SR + heat-map image, as stored)"] = send_cost(written + heatmaps, repeats,
                                                                  work, len(films))
    return figures


def service_torch_threads() -> int:
    """The model threads `pacs-ai serve` would use on this machine with the shipped defaults."""
    from pacs_ai.classify.capacity import sized_config
    from pacs_ai.config import parse_config

    return sized_config(parse_config({}, base_dir=REPO_ROOT)).workers.torch_threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # the listener's and the report's debug lines would cost CPU and bury the table
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sets = {f"2500x2048 DX, {args.synthetic} films": synthetic_files(args.synthetic),
            "samples (21, every syntax)": sample_files(None)}
    model = PneumoniaModel.load(MODEL_PATH)
    torch_threads = service_torch_threads()
    torch.set_num_threads(torch_threads)
    print(f"model threads: {torch_threads}, as the service would choose here", flush=True)
    results: dict[str, dict[str, float]] = {}
    for name, films in sets.items():
        with tempfile.TemporaryDirectory(prefix="step-costs-") as folder:
            work = Path(folder)
            receive = receive_costs(films, args.repeats, work)
            bare = receive.pop("bare pynetdicom receiver (for the ratio)")
            figures = dict(receive)
            figures["of which: write to spool (stage + commit, fsyncs)"] = spool_cost(
                films, args.repeats, work)
            figures.update(film_costs(films, model, args.repeats, work))
            figures["total (receive to send)"] = sum(
                value for key, value in figures.items() if not key.startswith("of which"))
            figures["bare pynetdicom receiver (for the ratio)"] = bare
            results[name] = {key: round(value, 1) for key, value in figures.items()}
    names = list(results)
    print(f"\nCPU ms per film, median of {args.repeats}\n")
    print(f"| step | {' | '.join(names)} |")
    print(f"| --- | {' | '.join('---' for _ in names)} |")
    for step in results[names[0]]:
        print(f"| {step} | {' | '.join(str(results[name][step]) for name in names)} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results,
                                         "torch_threads": torch_threads,
                                         "load_average": list(__import__("os").getloadavg())},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
