"""`pacs-ai retry` (placeholder until the listener lands)."""

from __future__ import annotations

import argparse

from pacs_ai.errors import UserError

HELP = "retry (not yet implemented)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file")


def run(args: argparse.Namespace) -> int:
    raise UserError("not implemented yet")
