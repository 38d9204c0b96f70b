"""The `pacs-ai` command: one subcommand per module in pacs_ai.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from pacs_ai import __version__
from pacs_ai.errors import UserError

# subcommand -> module with HELP, add_arguments(parser) and run(args) -> exit status.
COMMANDS = {
    "serve": "pacs_ai.commands.serve",
    "classify": "pacs_ai.commands.classify",
    "status": "pacs_ai.commands.status",
    "retry": "pacs_ai.commands.retry",
    "dismiss": "pacs_ai.commands.dismiss",
    "model": "pacs_ai.commands.model",
    "evaluate": "pacs_ai.commands.evaluate",
    "compare": "pacs_ai.commands.compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-ai", description="Chest-radiograph AI listener for DICOM networks.")
    parser.add_argument("--version", action="version", version=f"pacs-ai {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        from pacs_ai.ops.logs import stderr_is_the_journal

        priority = "<3>" if stderr_is_the_journal() else ""  # journalctl -p err shows it
        print(f"{priority}pacs-ai {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
