"""`pacs-ai evaluate FOLDER`: validate the model on the site's own labelled films before go-live.

The films go through the same steps as in the service (filters, intended age, decoding, the
model, abstention), with the threshold, age range and unknown_age the config would put in
force. Exit status 0 when the figures were computed, 1 when nothing (or no film of a class) could be
classified or the labels give no figures, 2 for usage errors (a missing folder, a CSV row whose
file is missing or whose label is unknown, a bad config or model file, an --out folder that
cannot be written: checked before the films are classified).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

HELP = ("validate the model on your own labelled films (NORMAL/ and PNEUMONIA/ sub-folders, "
        "or a CSV of path,label): AUC, sensitivity, specificity, abstention, a proposed site "
        "threshold, and a report folder")
DEFAULT_FLOOR = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER",
                        help="the films: DICOM, PNG or JPEG in NORMAL/ and PNEUMONIA/ "
                             "sub-folders (any case), or any folder with --labels")
    parser.add_argument("--labels", metavar="CSV",
                        help="a CSV of path,label (label normal/pneumonia or 0/1; paths "
                             "relative to the CSV's folder) instead of the sub-folders")
    parser.add_argument("--model", metavar="FILE",
                        help="model file (default: the config's [model] path, else the "
                             "shipped model)")
    parser.add_argument("--config", metavar="PATH",
                        help="the service's TOML config: its [filters], [limits] max_pixels "
                             "and [model] threshold/ood_threshold/age range/unknown_age apply "
                             "as in the service")
    parser.add_argument("--sensitivity-floor", type=float, default=DEFAULT_FLOOR,
                        metavar="S", help="the proposed threshold is the highest whose "
                        f"sensitivity on these films is >= S (default {DEFAULT_FLOOR})")
    parser.add_argument("--out", metavar="DIR",
                        help="where report.html, results.csv and summary.json go "
                             "(default ./evaluation-YYYY-MM-DD, or -2, -3, ... "
                             "after it when that exists)")
    parser.add_argument("--json", action="store_true",
                        help="print summary.json instead of the text summary")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.errors import UserError
    from pacs_ai.evaluate import report_folder
    from pacs_ai.evaluate import site_evaluation as evaluation
    from pacs_ai.evaluate.offline_classification import classify_files
    from pacs_ai.model.intended_use import format_age_range, site_model_info
    from pacs_ai.model.model import PneumoniaModel
    from pacs_ai.model.site_threshold import binding_problem, set_thresholds
    from pacs_ai.ops.logs import configure_logging

    floor = args.sensitivity_floor
    if not 0.0 < floor <= 1.0:
        raise UserError(f"--sensitivity-floor must be above 0 and at most 1, not {floor:g}")
    configure_logging("warning")  # on stderr; stdout carries the summary
    config = load_config(args.config)
    out = (Path(args.out) if args.out
           else report_folder.default_folder("evaluation"))
    labels_csv = Path(args.labels) if args.labels is not None else None
    # before the films, not after an hour of them; never over the labels CSV
    report_folder.check(out, evaluation.OUTPUT_FILES.values(), [labels_csv])
    try:
        labelled = evaluation.labelled_films(
            Path(args.folder), labels_csv)
    except evaluation.LabelsUnusable as error:
        print(f"pacs-ai evaluate: labels unusable: {error}", file=sys.stderr)
        return 1
    model = PneumoniaModel.load(args.model if args.model is not None else config.model.path)
    own = model.info
    # a [model] threshold or ood_threshold chosen for another file (or for none said) is not
    # applied, as the service would refuse it: the file's own is evaluated, and a note says why
    unbound = binding_problem(config.model.site_threshold, own, model.sha256)
    site_threshold = config.model.threshold if unbound is None else None
    site_ood_threshold = config.model.ood_threshold if unbound is None else None
    if unbound is not None:
        keys = set_thresholds(config.model.site_threshold)
        labelled.notes.append(f"[model] {' and '.join(keys)} in {config.source} not used, the "
                              f"model file's own {'are' if len(keys) > 1 else 'is'}: {unbound}")
    model.info = site_model_info(own, threshold=site_threshold,
                                 min_age_years=config.model.min_age_years,
                                 max_age_years=config.model.max_age_years,
                                 ood_threshold=site_ood_threshold)
    policy = config.filters.with_intended_age(model.info.intended_age_years,
                                              config.model.unknown_age)

    results = classify_files([film.path for film in labelled.films], model, policy,
                             config.limits.max_pixels)
    rows = evaluation.classify_labelled(labelled.films, results, progress=_progress())
    context: dict[str, Any] = {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "folder": str(args.folder), "labels_source": labelled.source,
        "notes": labelled.notes,
        "model": {"name": own.name, "version": own.version, "file": str(model.path),
                  "sha256": model.sha256, "model_threshold": own.threshold,
                  "threshold_source": (f"[model] threshold in {config.source}"
                                       if site_threshold is not None else "model file"),
                  "intended_age": (f"{format_age_range(model.info.intended_age_years)} years"
                                   if model.info.intended_age_years else "not stated"),
                  # the gate's threshold in force (the config's where bound to this file),
                  # and the file's own, as for the probability threshold
                  "ood_threshold": model.info.ood_threshold,
                  "model_ood_threshold": own.ood_threshold,
                  "ood_threshold_source": (f"[model] ood_threshold in {config.source}"
                                           if site_ood_threshold is not None
                                           else "model file")},
        "config": str(config.source) if config.source else None,
    }
    summary = evaluation.summarise(
        rows, threshold=model.info.threshold, floor=floor, context=context,
        config_lines=lambda threshold: _proposed_lines(threshold, own, model.sha256, config,
                                                       site_ood_threshold))
    evaluation.write_outputs(out, rows, summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if not summary["figures_computed"]:
        per_class = summary["counts"]["per_class"]
        print("pacs-ai evaluate: no figures: "
              + ("nothing could be classified" if summary["counts"]["classified"] == 0 else
                 " and ".join(f"no {name} film" for name in per_class
                              if per_class[name]["classified"] == 0) + " could be classified")
              + f" (skipped and error reasons in {summary['outputs']['results_csv']})",
              file=sys.stderr)
        return 1
    return 0


def _proposed_lines(threshold: str, own, sha256: str, config, site_ood_threshold) -> str:
    """The [model] lines that put `threshold` in force for this file. They bind the table's
    thresholds together, so they carry the ood_threshold evaluated with; one the config sets
    for another file was not evaluated, and the lines would bind it to this file: say to
    remove it."""
    from pacs_ai.model.site_threshold import threshold_lines

    lines = threshold_lines("model", threshold, own, sha256, ood_threshold=site_ood_threshold)
    if config.model.ood_threshold is not None and site_ood_threshold is None:
        lines += (f"\n# and remove [model] ood_threshold = {config.model.ood_threshold!r}: it was "
                  "chosen for another model file, and these lines would bind it to this one")
    return lines


def _progress():
    """'classified 200 of 1200 films' on a terminal's stderr, else nothing."""
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            end = "\n" if done == total else ""
            print(f"\rclassified {done} of {total} films", end=end, file=sys.stderr, flush=True)
    return report


def print_summary(summary: dict[str, Any]) -> None:
    counts, rates, model = summary["counts"], summary["rates"], summary["model"]
    per_class = counts["per_class"]
    print(f"films:      {counts['films']} ({summary['labels_source']}): "
          f"{per_class['normal']['films']} normal, {per_class['pneumonia']['films']} pneumonia")
    print(f"model:      {model['name']} {model['version']} ({model['file']})")
    print(f"threshold:  {summary['threshold']:.4f} ({model['threshold_source']}); "
          f"intended age {model['intended_age']}")
    for note in summary["notes"]:
        print(f"note:       {note}")
    print()
    skipped = ", ".join(f"{code} {n}" for code, n in counts["skipped_by_reason"].items())
    errors = ", ".join(f"{code} {n}" for code, n in counts["errors_by_reason"].items())
    print(f"classified  {counts['classified']:>6}  ({rates['classified']:.1%})")
    print(f"skipped     {counts['skipped']:>6}  ({rates['skipped']:.1%})"
          + (f": {skipped}" if skipped else ""))
    print(f"errors      {counts['errors']:>6}  ({rates['errors']:.1%})"
          + (f": {errors}" if errors else ""))
    print(f"abstention (out-of-distribution): {rates['abstention']:.1%} of the films "
          f"(normal {per_class['normal']['abstained']}, "
          f"pneumonia {per_class['pneumonia']['abstained']})")
    classified, everything = summary["classified"], summary["all_films"]
    if classified is not None:
        print()
        print(f"at threshold {summary['threshold']:.4f}    classified films ({classified['films']})"
              f"    all films ({everything['films']}; not reported = wrong)")
        for key in ("roc_auc", "sensitivity", "specificity", "accuracy"):
            interval = classified.get(f"{key}_ci95")
            shown = f"{classified[key]:.3f}" + (
                f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")
            label = "AUC" if key == "roc_auc" else key
            print(f"  {label:<22}{shown:<26}{everything[key]:.3f}")
        matrix = everything["confusion_matrix"]["counts"]
        (tn, fp, silent_normal), (fn, tp, silent_pneumonia) = matrix
        print()
        print("confusion matrix (rows: true class; columns: the model's finding)")
        print(f"  {'':<16}{'normal':>8}{'pneumonia':>11}{'not reported':>14}")
        print(f"  {'true normal':<16}{tn:>8}{fp:>11}{silent_normal:>14}")
        print(f"  {'true pneumonia':<16}{fn:>8}{tp:>11}{silent_pneumonia:>14}")
        proposal = summary["proposed_threshold"]
        print()
        print(f"proposed site threshold (sensitivity floor {proposal['floor']:g}): "
              f"{proposal['threshold']:.6f}")
        print(f"  classified films: sensitivity {proposal['sensitivity']:.3f}, specificity "
              f"{proposal['specificity']:.3f} (at {summary['threshold']:.4f}: "
              f"{classified['sensitivity']:.3f}, {classified['specificity']:.3f})")
        print(f"  all films:        sensitivity {proposal['all_films']['sensitivity']:.3f}, "
              f"specificity {proposal['all_films']['specificity']:.3f}")
        if summary["too_small"]:
            print("  not to be relied on: too few films (see the warning below)")
        print("  to use it, put these lines in the service's config and restart it:")
        for line in proposal["config"].splitlines():
            print(f"    {line}")
    print()
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}")
    outputs = summary["outputs"]
    print(f"written:    {outputs['report_html']}, {outputs['results_csv']}, "
          f"{outputs['summary_json']}")
