"""`pacs-ai classify PATH...`: offline classification, one JSON object per line."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "classify DICOM, PNG or JPEG files or folders; prints one JSON line per file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    parser.add_argument("--model", help="model file (default: the shipped model)")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.classify import classify_files
    from pacs_ai.model import PneumoniaModel

    model = PneumoniaModel.load(args.model)
    classified = 0
    for result in classify_files(args.paths, model):
        classified += result["status"] == "ok"
        print(json.dumps(result), flush=True)
    if classified == 0:
        print("pacs-ai classify: nothing could be classified", file=sys.stderr)
        return 1
    return 0
