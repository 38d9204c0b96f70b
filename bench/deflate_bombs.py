"""Memory of `pacs-ai serve` while deflate bombs arrive at once (issue 23 item 2).

Starts the service (the shipped model, default [limits]: max_dataset_bytes 256 MiB, max_pixels
50 M), sends N deflated C-STOREs of about 1 MB that each inflate to --inflated-gb, all at once
over N associations (pynetdicom, the files' bytes as they are), and prints their statuses, the
service's resident size before (VmRSS) and its peak while they arrived (VmHWM, reset just
before), and the seconds until the last answer. Then one real deflated film
(sample_dicoms/cr_pneumonia_pa_12bit_deflated.dcm) is sent, to show it is still taken.

Bomb shapes (tests.hostile_input.deflate_bomb): "padding", a small film followed by Data Set
Trailing Padding of zeros (within every pixel limit: only the inflated size gives it away);
"pixels", zero pixels with Rows x Columns declaring the size (issue 14's, and issue 23's
report: 1 GB is 22627 x 22627, over max_pixels).

    .venv/bin/python bench/deflate_bombs.py                  # 6 bombs of 1 GB, both shapes
    .venv/bin/python bench/deflate_bombs.py --count 6 --inflated-gb 1 --bulk padding

Figures to read, never pass/fail checks (tests/test_faults.py holds the bound).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from testbed.dicom_peers import (ServiceProcess, synthetic_radiograph,  # noqa: E402
                                 write_service_config)
from testbed.real_peers import reset_peak_rss, status_kb  # noqa: E402
from tests.hostile_input import deflate_bomb, send_files_at_once  # noqa: E402

MODEL_PATH = REPO_ROOT / "deploy" / "models" / "pacs-ai-pneumonia.pt"
DEFLATED_FILM = REPO_ROOT / "sample_dicoms" / "cr_pneumonia_pa_12bit_deflated.dcm"


def run(bulk: str, count: int, inflated_bytes: int, work: Path) -> None:
    source = synthetic_radiograph(seed=7, rows=256, columns=256)
    bombs = [deflate_bomb(source, work / f"{bulk}-{index}.dcm", inflated_bytes=inflated_bytes,
                          bulk=bulk) for index in range(count)]
    config = write_service_config(work, model=MODEL_PATH, tables={"log": {"level": "info"}})
    with ServiceProcess(config, work / "serve.log") as service:
        pid = service.process.pid
        resident_kb = status_kb(pid, "VmRSS")
        reset_peak_rss(pid)
        started = time.monotonic()
        results = send_files_at_once(service.port, bombs)
        seconds = time.monotonic() - started
        peak_kb = status_kb(pid, "VmHWM")
        [film] = send_files_at_once(service.port, [DEFLATED_FILM])
    statuses = sorted({f"0x{r.status:04X} {r.error_comment}" if r.status is not None
                       else "no answer" for r in results})
    wire = sum(bomb.stat().st_size for bomb in bombs) / 1e6
    print(f"{bulk}: {count} bombs of {inflated_bytes / 2**30:g} GiB inflated "
          f"({wire:.1f} MB on the wire in all), answered in {seconds:.1f} s: {statuses}")
    print(f"  service resident {resident_kb / 1024:.0f} MB before; peak while they arrived "
          f"{peak_kb / 1024:.0f} MB (+{(peak_kb - resident_kb) / 1024:.0f} MB)")
    print(f"  then {DEFLATED_FILM.name}: "
          f"{'0x%04X' % film.status if film.status is not None else 'no answer'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--inflated-gb", type=float, default=1.0)
    parser.add_argument("--bulk", choices=("padding", "pixels", "both"), default="both")
    args = parser.parse_args()
    for bulk in ("padding", "pixels") if args.bulk == "both" else (args.bulk,):
        with tempfile.TemporaryDirectory(prefix="deflate-bombs-") as folder:
            run(bulk, args.count, int(args.inflated_gb * 2**30), Path(folder))


if __name__ == "__main__":
    main()
