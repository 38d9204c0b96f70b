"""Option types the subcommands share: argparse turns their ArgumentTypeError into a usage error
(exit 2) that names the option."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(minimum: int) -> Callable[[str], int]:
    """A whole number of at least `minimum` (a negative --limit listed nothing, a --max-pixels of
    0 refused every film, both as if that were what was asked)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse
