"""Test-only fault injection for `pacs-ai serve` subprocesses; never installed, never imported by
the service itself. A test that wants it starts the service with ``PYTHONPATH`` set to this
folder, so Python imports this module at start-up (the ``sitecustomize`` hook of ``site``).

``PACS_AI_FAULT_ENOSPC_FLAG=<path>``: while the file <path> exists, every write to a spool temp
file (``<spool>/incoming/*.part``) writes the first half of its bytes and then fails with
``OSError(ENOSPC)``, as a full disk does in the middle of a write. Only those files: the job queue
(SQLite) is unaffected. tests/test_faults.py uses it where a small tmpfs cannot be mounted (no
CAP_SYS_ADMIN) and says so in its output.
"""

from __future__ import annotations

import errno
import os

_FLAG = os.environ.get("PACS_AI_FAULT_ENOSPC_FLAG")


class _FillingUpFile:
    """A file object whose writes hit a full disk while the flag file exists."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data) -> int:
        if _FLAG and os.path.exists(_FLAG):
            self._handle.write(bytes(data)[: len(data) // 2])
            self._handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device (injected by the test hook)")
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self._handle.__exit__(*exc_info)


if _FLAG:
    _real_fdopen = os.fdopen

    def _fdopen(fd, *args, **kwargs):
        handle = _real_fdopen(fd, *args, **kwargs)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return handle
        if f"{os.sep}incoming{os.sep}" in target and target.endswith(".part"):
            return _FillingUpFile(handle)
        return handle

    os.fdopen = _fdopen


# ``PACS_AI_FAULT_CRASH_MARKER=<text>``: in a helper process (not the service's main process),
# preparing an image whose file contains <text> kills the process with SIGSEGV, as a decoder
# crashing in C code does. tests/test_faults.py puts <text> in one image's Image Comments.
_CRASH_MARKER = os.environ.get("PACS_AI_FAULT_CRASH_MARKER")

if _CRASH_MARKER:
    import multiprocessing
    import signal

    import pacs_ai.film.film_input

    _real_prepare = pacs_ai.film.film_input.prepare

    def _crashing_prepare(path, *args, **kwargs):
        if multiprocessing.parent_process() is not None:
            with open(path, "rb") as handle:
                if _CRASH_MARKER.encode() in handle.read():
                    os.kill(os.getpid(), signal.SIGSEGV)
        return _real_prepare(path, *args, **kwargs)

    pacs_ai.film.film_input.prepare = _crashing_prepare


# ``PACS_AI_FAULT_HELPER_BROKEN=1``: the helper's start-up check fails as a broken install would
# (an import error); the service must refuse to start with a message. Only helpers run the check
# (the service submits it to them by name), so replacing it everywhere is enough.
if os.environ.get("PACS_AI_FAULT_HELPER_BROKEN"):
    import pacs_ai.classify.helper_processes

    def _broken_warm_up() -> int:
        raise ImportError("injected by the test hook: a library of the helper is missing")

    pacs_ai.classify.helper_processes._warm_up = _broken_warm_up


# ``PACS_AI_FAULT_KILL_BETWEEN_DELIVERIES=<path>``: in the service process, while the file <path>
# exists, the moment the queue has recorded a report as delivered to a destination that still
# has the same job's heat-map image to send, the file is removed and the process is killed with
# SIGKILL: a kill -9 between the two deliveries of one film (tests/test_heatmap_peers.py).
_BETWEEN_DELIVERIES = os.environ.get("PACS_AI_FAULT_KILL_BETWEEN_DELIVERIES")

if _BETWEEN_DELIVERIES:
    import signal

    import pacs_ai.queue.jobs

    _real_delivery_succeeded = pacs_ai.queue.jobs.JobStore.delivery_succeeded

    def _killing_delivery_succeeded(self, job_id, destination, object="report"):
        result = _real_delivery_succeeded(self, job_id, destination, object)
        if object == "report" and os.path.exists(_BETWEEN_DELIVERIES):
            pending = self._read("SELECT COUNT(*) FROM deliveries WHERE job_id = ? AND "
                                 "destination = ? AND object = 'heatmap' AND state = 'pending'",
                                 (job_id, destination))[0][0]
            if pending:
                os.remove(_BETWEEN_DELIVERIES)
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    pacs_ai.queue.jobs.JobStore.delivery_succeeded = _killing_delivery_succeeded
