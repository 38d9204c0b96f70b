"""CPU a pynetdicom acceptor spends on N open, idle associations (its polling threads).

The requestors run in other processes, so only the receiving side is counted. `--dul-delay`
sets pynetdicom's private DUL idle delay (default 0.001 s) on each accepted association.

    .venv/bin/python bench/idle_associations.py 4
    .venv/bin/python bench/idle_associations.py 4 --dul-delay 0.005
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

REQUESTOR = """
import time
from pynetdicom import AE
from pynetdicom.sop_class import Verification
ae = AE(); ae.add_requested_context(Verification)
association = ae.associate("127.0.0.1", {port})
time.sleep({hold})
association.release()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("associations", type=int)
    parser.add_argument("--dul-delay", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    def on_open(event) -> None:
        if args.dul_delay is not None:
            event.assoc.dul._run_loop_delay = args.dul_delay

    ae = AE()
    ae.supported_contexts = StoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_associations = max(args.associations, 1)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    port = server.server_address[1]
    hold = args.seconds + 4
    peers = [subprocess.Popen([sys.executable, "-c", REQUESTOR.format(port=port, hold=hold)])
             for _ in range(args.associations)]
    time.sleep(2.5)  # the requestors start and associate
    started = time.process_time()
    time.sleep(args.seconds)
    used = time.process_time() - started
    print(f"{len(server.active_associations)} idle associations: the acceptor used "
          f"{used / args.seconds * 100:.1f} % of a core")
    for peer in peers:
        peer.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
