"""pynetdicom's STORE_RECV_CHUNKED_DATASET against the listener's in-memory buffer: wall time and
CPU of the receiving process per film, for films sent by DCMTK storescu in one association.

- buffer (what pacs_ai.receive.scp does): the dataset arrives in memory (`event.request.DataSet`); the
  handler writes a Part 10 header and that buffer to a file in the spool, fsyncs, renames.
- chunked: pynetdicom writes each received fragment to a temporary Part 10 file itself (here in
  the spool's folder, so a rename is enough); the handler fsyncs and renames it.

Both read PDUs with pacs_ai.network.sockets.read_pdus_in_large_chunks, as the listener does. Each run
is a fresh process (the setting is process-wide); the modes alternate.

    .venv/bin/python bench/recv_chunked.py [--films 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

CACHE = REPO_ROOT / "runs" / "bench-cache"  # the 2500x2048 DX films run_bench.py makes


def receive(mode: str, films: list[Path], spool: Path) -> dict:
    from pynetdicom import AE, StoragePresentationContexts, _config, evt
    from pynetdicom.dsutils import encode_file_meta

    from pacs_ai.network.sockets import read_pdus_in_large_chunks
    from testbed.dicom_peers import free_port

    spool.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(spool)  # pynetdicom's NamedTemporaryFile: same filesystem
    _config.STORE_RECV_CHUNKED_DATASET = mode == "chunked"
    stored = []

    def durable(path: Path, target: Path) -> None:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(path, target)

    def on_store(event) -> int:
        target = spool / f"{event.request.AffectedSOPInstanceUID}.dcm"
        if mode == "chunked":
            durable(event.dataset_path, target)
        else:
            staged = spool / f"{target.name}.part"
            body = event.request.DataSet.getbuffer()
            try:
                with open(staged, "wb") as handle:
                    handle.write(b"\0" * 128 + b"DICM" + encode_file_meta(event.file_meta))
                    handle.write(body)
            finally:
                body.release()
            durable(staged, target)
        stored.append(target)
        return 0x0000

    ae = AE(ae_title="BENCH")
    ae.maximum_pdu_size = 0
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_CONN_OPEN, lambda event: read_pdus_in_large_chunks(event.assoc))])
    try:
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        completed = subprocess.run([shutil.which("storescu"), "-aec", "BENCH", "-xe", "-nh",
                                    "127.0.0.1", str(port), *map(str, films)],
                                   capture_output=True, text=True, timeout=600)
        wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    finally:
        server.shutdown()
    assert completed.returncode == 0 and len(stored) == len(films), completed.stderr
    return {"mode": mode, "films": len(films), "ms_per_film": 1000 * wall / len(films),
            "cpu_ms_per_film": 1000 * cpu / len(films)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    films = sorted(CACHE.glob("dx_2500x2048_*.dcm"))[:args.films]
    if args.child:
        with tempfile.TemporaryDirectory(dir=REPO_ROOT / "runs") as folder:
            print(json.dumps(receive(args.child, films, Path(folder) / "spool")))
        return
    if len(films) < args.films:
        sys.exit(f"{args.films} films wanted in {CACHE}; run bench/run_bench.py --images "
                 f"{args.films} first")
    rows = []
    for _ in range(args.repeats):
        for mode in ("buffer", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--films", str(args.films),
                                  "--child", mode], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.splitlines()[-1]))
            print(rows[-1])
    print(f"\n{'mode':8} {'median ms/film':>15} {'median CPU ms/film':>19}  ({args.repeats} runs "
          f"of {args.films} films, {films[0].stat().st_size / 1e6:.1f} MB each)")
    for mode in ("buffer", "chunked"):
        mine = [r for r in rows if r["mode"] == mode]
        median = lambda key: sorted(r[key] for r in mine)[len(mine) // 2]  # noqa: E731
        print(f"{mode:8} {median('ms_per_film'):15.1f} {median('cpu_ms_per_film'):19.1f}")


if __name__ == "__main__":
    main()
