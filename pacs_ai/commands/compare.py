"""`pacs-ai compare`: the live model and the [shadow] model over the films both assessed, from
the job queue the service keeps (it may be running meanwhile). Exit status 0 with figures, 1
when the queue holds no film both assessed (in the period asked), 2 for usage errors (a bad
config, date or labels file, no queue yet, an --out folder that cannot be written)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

HELP = ("compare the [shadow] model with the live one on the films both assessed: agreement, "
        "flips, positive and abstention rates, a probability scatter plot; with --labels, both "
        "models' sensitivity and specificity on the site's labelled films")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help="the service's TOML config (its spool holds the results; default "
                             "./spool)")
    parser.add_argument("--since", metavar="DATE",
                        help="only films received since DATE (YYYY-MM-DD, local time, or an "
                             "ISO date and time)")
    parser.add_argument("--labels", metavar="CSV",
                        help="the site's labels: a CSV with a header naming label and "
                             "sop_instance_uid or accession_number, or the path,label CSV "
                             "pacs-ai evaluate takes (DICOM files, matched by their SOP "
                             "Instance UID)")
    parser.add_argument("--out", metavar="DIR",
                        help="where report.html, scatter.svg, films.csv and summary.json go "
                             "(default ./compare-YYYY-MM-DD, or -2, -3, ... "
                             "after it when that exists)")
    parser.add_argument("--json", action="store_true",
                        help="print summary.json instead of the text summary")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.evaluate import comparison, report_folder
    from pacs_ai.model.site_threshold import file_sha256
    from pacs_ai.queue.jobs import JobStore
    from pacs_ai.queue.spool import Spool

    config = load_config(args.config)
    since = comparison.parse_since(args.since) if args.since is not None else None
    out = (Path(args.out) if args.out
           else report_folder.default_folder("compare"))
    labels_csv = Path(args.labels) if args.labels else None
    # before the labels' DICOM files are read; never over the labels CSV
    report_folder.check(out, comparison.OUTPUT_FILES.values(), [labels_csv])
    labels = comparison.read_labels(labels_csv) if labels_csv is not None else None
    store = JobStore.open(Spool(config.storage.spool_dir).db_path, create=False)
    try:
        results = store.shadow_results(received_since=since)
    finally:
        store.close()
    live_path, shadow_path = config.model_path(), config.shadow.model
    context: dict[str, Any] = {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": str(config.source) if config.source else None,
        "since": args.since, "notes": []}
    if shadow_path is None:
        context["notes"].append("the config sets no [shadow] model: the latest pair of models "
                                "in the queue is compared")
    summary, rows = comparison.compare(
        results, live_sha256=file_sha256(live_path) if live_path.is_file() else None,
        shadow_sha256=file_sha256(shadow_path) if shadow_path is not None else None,
        labels=labels, context=context)
    comparison.write_outputs(out, summary, rows)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if not summary["films"]:
        print("pacs-ai compare: no film assessed by both models"
              + (f" received since {args.since}" if args.since else "")
              + ": is [shadow] model set, and has the service classified films since?",
              file=sys.stderr)
        return 1
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    live, shadow = summary["live"], summary["shadow"]
    if live is None:
        print("films:      0")
        return
    print(f"live:       {live['name']} {live['version']} (threshold "
          f"{', '.join(f'{t:.4f}' for t in live['thresholds'])})")
    print(f"shadow:     {shadow['name']} {shadow['version']} (threshold "
          f"{', '.join(f'{t:.4f}' for t in shadow['thresholds'])})")
    missed = ", ".join(f"{status} {n}" for status, n in summary["not_assessed"].items())
    print(f"films:      {summary['films']} assessed by both"
          + (f" (not by the shadow: {missed})" if missed else ""))
    for note in summary.get("notes", []):
        print(f"note:       {note}")
    if not summary["films"]:
        return
    rates, flips, changes = summary["rates"], summary["flips"], summary["abstention_changes"]
    print(f"agreement:  {summary['agreement']:.1%} same outcome")
    print(f"flips:      normal -> pneumonia {flips['normal_to_pneumonia']}, "
          f"pneumonia -> normal {flips['pneumonia_to_normal']}")
    print(f"abstention: reported -> abstained {changes['reported_to_abstained']}, "
          f"abstained -> reported {changes['abstained_to_reported']}")
    print()
    print(f"{'':<22}{'live':>10}{'shadow':>10}")
    for key, label in (("positive_rate", "positive rate"),
                       ("abstention_rate", "abstention rate")):
        cells = [rates[side][key] for side in ("live", "shadow")]
        print(f"{label:<22}" + "".join(f"{'n/a' if c is None else f'{c:.1%}':>10}"
                                       for c in cells))
    labels = summary.get("labels")
    if labels is not None:
        print()
        print(f"labelled:   {labels['films']} of these films ({labels['normal']} normal, "
              f"{labels['pneumonia']} pneumonia; {labels['source']})")
        for note in labels["notes"]:
            print(f"note:       {note}")
        if labels["live"] and labels["live"]["computed"] and labels["shadow"]["computed"]:
            print(f"{'':<22}{'live':>10}{'shadow':>10}  (films each reported on)")
            for key in ("sensitivity", "specificity"):
                print(f"{key:<22}" + "".join(f"{labels[side]['reported'][key]:>10.3f}"
                                             for side in ("live", "shadow")))
            if labels["live"]["too_small"] or labels["shadow"]["too_small"]:
                print("WARNING: too few labelled films to trust these figures: at least 50 "
                      "of each class are needed")
        else:
            print("            no figures: both classes are needed among the films each model "
                  "reported on")
    for pair in summary.get("other_pairs", []):
        print(f"also:       {pair['films']} films of {pair['live']} with shadow "
              f"{pair['shadow']} (not compared here)")
    outputs = summary["outputs"]
    print(f"written:    {outputs['report_html']}, {outputs['scatter_svg']}, "
          f"{outputs['films_csv']}, {outputs['summary_json']}")
