"""`pacs-ai serve [--config PATH]`: run the DICOM listener until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

HELP = ("run the DICOM listener: receive chest films by C-STORE, classify them, send the SR to "
        "the configured PACS (without --config: port 11112, spool ./spool, no destination)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help="TOML config file (see deploy/pacs-ai.toml); default: built-in local "
                             "settings")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.ops.logs import configure_logging
    from pacs_ai.service import serve_until_signalled

    config = load_config(args.config)
    configure_logging(config.log.level, config.log.format, config.log.priority_prefix)
    return serve_until_signalled(config)
