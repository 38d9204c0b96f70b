"""The --out folder of `pacs-ai evaluate` and `pacs-ai compare`: checked before the work starts,
so that an hour of classification does not end in a traceback for a folder that cannot be
written; a write that fails all the same is a one-line error naming the folder."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pacs_ai.errors import UserError


def default_folder(prefix: str) -> Path:
    """./PREFIX-YYYY-MM-DD, or -2, -3, ... after it when a run earlier today left that one: a
    second run the same day (another model, another config) keeps the first run's report."""
    first = Path(f"{prefix}-{datetime.date.today().isoformat()}")
    folder, number = first, 1
    while folder.exists():
        number += 1
        folder = Path(f"{first}-{number}")
    return folder


def check(out: Path, files: Iterable[str] = (), inputs: Iterable[Path | None] = ()) -> None:
    """UserError unless `out` is a folder that can be written, or one that can be created, and
    none of the report's `files` in it is one of the run's `inputs` (a labels CSV named
    films.csv beside `compare --out`'s films.csv would be overwritten by it).
    Creates nothing: a run that fails before its report leaves no empty folder."""
    written = {(out / name).resolve(): name for name in files}
    for given in inputs:
        if given is not None and given.resolve() in written:
            raise UserError(f"--out {out}: its {written[given.resolve()]} would overwrite "
                            f"{given}, which this run reads; choose another --out")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        where = out
    else:
        where = next(parent for parent in out.absolute().parents if parent.exists())
        if not where.is_dir():
            raise UserError(f"--out {out}: {where} is not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: no permission to write in {where}")


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """Creates `out` for the writes in the block; an OSError there (a read-only file system, a
    full disk) becomes a UserError that names the folder."""
    check(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as error:
        raise UserError(f"--out {out}: cannot write the report: "
                        f"{error.strerror or error}") from None
