"""`pacs-ai model`: print the model card of the model the service would load."""

from __future__ import annotations

import argparse
import json

HELP = "print the loaded model's card: name, version, threshold, validation metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--json", action="store_true", help="print the full metadata as JSON")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.model import PneumoniaModel

    model = PneumoniaModel.load(args.model)
    metadata = model.info.metadata
    if args.json:
        print(json.dumps(metadata, indent=2, sort_keys=True))
        return 0
    metrics = metadata.get("validation_metrics", {})
    print(f"model:      {model.info.label}")
    print(f"file:       {model.path}")
    print(f"threshold:  {model.info.threshold:.4f} ({metadata.get('threshold_rule', 'rule not recorded')})")
    print(f"created:    {metadata.get('created', '?')}  commit {metadata.get('git_commit', '?')}")
    print(f"intended:   {_intended_use(model.info)}")
    print(f"abstains:   {_abstention(model.info)}")
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece"):
        if key in metrics:
            print(f"val {key + ':':<13}{metrics[key]:.4f}")
    return 0


def _intended_use(info) -> str:
    from pacs_ai.intended_use import format_age_range

    parts = []
    if info.intended_age_years is not None:
        parts.append(f"ages {format_age_range(info.intended_age_years)} years "
                     "(films of other ages are skipped)")
    if info.intended_views is not None:
        parts.append(f"views {', '.join(info.intended_views) or '(none)'}")
    return "; ".join(parts) or "not stated in the model file (no age check)"


def _abstention(info) -> str:
    if info.ood_threshold is None:
        return "never (the model file has no out-of-distribution score)"
    ood = info.metadata.get("ood", {})
    rate = ood.get("validation_abstention")
    share = f"; {rate:.1%} of its validation films" if isinstance(rate, (int, float)) else ""
    return (f"on films whose out-of-distribution score is above {info.ood_threshold:.3f}"
            f"{share} (skipped as out-of-distribution, no finding sent)")
