"""The spool folder: received images, reports waiting to be sent, and the job queue.

Layout under `[storage] spool_dir`:
    jobs.sqlite   the durable job queue (pacs_ai.queue.jobs)
    incoming/     temporary files being written; anything here at start-up is an unfinished write
    images/       received instances, one file per SOP Instance UID
    outbox/       reports (SR) waiting for delivery
    pacs-ai.lock  held (flock) by the one running `pacs-ai serve` of this spool

A file is written durably: temp file in incoming/, fsync, rename into place, fsync the folder.
After that a crash or power loss cannot leave a half-written file under images/ or outbox/.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO

from pacs_ai.errors import UserError

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFullError(OSError):
    """The spool's disk is below the free-space floor or full."""


def uid_filename(uid: str) -> str:
    """A file name for a UID: the UID itself when it is a clean dotted UID, else a hash of it
    (a hostile peer's "UID" must never become a path)."""
    if len(uid) <= 64 and _SAFE_UID.match(uid):
        return f"{uid}.dcm"
    return f"x{hashlib.sha256(uid.encode('utf-8', 'surrogateescape')).hexdigest()[:40]}.dcm"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.images = self.root / "images"
        self.outbox = self.root / "outbox"
        self.db_path = self.root / "jobs.sqlite"
        self._lock_file: IO[bytes] | None = None

    def prepare(self) -> None:
        """Create the folders (private to the service user) and drop unfinished temp files."""
        try:
            for folder in (self.root, self.incoming, self.images, self.outbox):
                folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create spool folder {self.root}: {error.strerror}; set "
                            "[storage] spool_dir to a writable folder") from None
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)

    def lock(self) -> None:
        """Hold the spool for this process; a second `serve` on the same spool is refused."""
        handle = open(self.root / "pacs-ai.lock", "ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"another pacs-ai serve is using the spool {self.root}; stop it or "
                            "set a different [storage] spool_dir") from None
        self._lock_file = handle

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def image_path(self, sop_instance_uid: str) -> Path:
        return self.images / uid_filename(sop_instance_uid)

    def report_path(self, report_uid: str) -> Path:
        return self.outbox / uid_filename(report_uid)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def write_problem(self) -> str | None:
        """Why a received image could not be written now (None: it could): a one-byte file is
        created, written and removed in incoming/, where every image starts."""
        try:
            fd, name = tempfile.mkstemp(dir=self.incoming, prefix="probe-", suffix=".part")
        except OSError as error:
            return f"cannot create a file in {self.incoming}: {error.strerror or error}"
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"\0")
                handle.flush()
        except OSError as error:
            return f"cannot write to {self.incoming}: {error.strerror or error}"
        finally:
            try:
                os.unlink(name)
            except OSError:
                pass
        return None

    def check_room(self, size: int, min_free_bytes: int) -> None:
        """Raise SpoolFullError when writing `size` bytes would go below the floor."""
        free = self.free_bytes()
        if free - size < min_free_bytes:
            raise SpoolFullError(errno.ENOSPC, f"spool has {free} bytes free, {size} needed "
                                               f"above the floor of {min_free_bytes}")

    def stage(self, *chunks: bytes | memoryview) -> Path:
        """Write the chunks, in order, to a new fsynced temp file in incoming/ (same file system
        as the spool). Several chunks spare the caller joining them into one more copy."""
        fd, temp_name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    def commit(self, staged: Path, target: Path) -> None:
        """Move a staged file into place and make the rename itself durable."""
        os.replace(staged, target)
        fsync_dir(target.parent)

    def write_durably(self, target: Path, data: bytes) -> None:
        """Write `data` to `target` so that it is either complete or absent after a crash."""
        staged = self.stage(data)
        try:
            self.commit(staged, target)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise

    def remove(self, relative: str | None) -> None:
        if relative:
            self.resolve(relative).unlink(missing_ok=True)
