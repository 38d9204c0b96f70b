"""`pacs-ai classify PATH...`: offline classification, one JSON object per line."""

from __future__ import annotations

import argparse
import json
import sys

from pacs_ai.commands.arguments import whole_number

HELP = "classify DICOM, PNG or JPEG files or folders; prints one JSON line per file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="files or folders (a folder walk passes over .md/.json/.txt "
                             "files and hidden files)")
    parser.add_argument("--max-pixels", type=whole_number(1), default=None, metavar="N",
                        help="refuse images declaring more pixels than this "
                             "(default: the service's limit)")
    parser.add_argument("--model", help="model file (default: the shipped model)")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import DEFAULT_MAX_PIXELS, FilterPolicy
    from pacs_ai.evaluate.offline_classification import NOT_IMAGE_SUFFIXES, classify_files
    from pacs_ai.model.model import PneumoniaModel
    from pacs_ai.ops.logs import configure_logging

    configure_logging("warning")  # on stderr: stdout carries one JSON line per file
    model = PneumoniaModel.load(args.model)
    max_pixels = args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS
    classified = files = 0
    # the service's default filters and the model's own intended age range
    policy = FilterPolicy().with_intended_age(model.info.intended_age_years)
    for result in classify_files(args.paths, model, policy, max_pixels):
        classified += result["status"] == "ok"
        files += 1
        print(json.dumps(result), flush=True)
    if files == 0:  # only folders, holding no candidate file: say so, not "could not"
        print(f"pacs-ai classify: no file to classify in {', '.join(args.paths)} (a folder walk "
              f"passes over hidden files and {'/'.join(sorted(NOT_IMAGE_SUFFIXES))} files)",
              file=sys.stderr)
        return 1
    if classified == 0:
        print("pacs-ai classify: nothing could be classified", file=sys.stderr)
        return 1
    return 0
