"""`pacs-ai model`: print the model card of the model the service would load."""

from __future__ import annotations

import argparse
import json

HELP = ("print the model's card: name, version, threshold, validation metrics (with --config: "
        "the model that config uses, and its site settings)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model file (default: the one --config uses, else the "
                                        "shipped model)")
    parser.add_argument("--config", metavar="PATH",
                        help="the service's TOML config: show the model its [model] path names "
                             "(unless --model is given) and the settings it puts in force")
    parser.add_argument("--json", action="store_true", help="print the full metadata as JSON")


def run(args: argparse.Namespace) -> int:
    from pacs_ai.config import load_config
    from pacs_ai.model.model import PneumoniaModel

    config = load_config(args.config) if args.config else None
    path = args.model
    if path is None and config is not None:
        path = config.model_path()
    model = PneumoniaModel.load(path)
    metadata = model.info.metadata
    # the checks the service makes at start, before anything is printed, --json or not: an
    # admin's pre-restart check must not pass where the service would refuse the config
    site = _site_settings(config, model.info, model.sha256) if config is not None else None
    shadow = (_shadow(config) if config is not None and config.shadow.model is not None
              else None)
    if args.json:
        print(json.dumps(metadata, indent=2, sort_keys=True))
        return 0
    metrics = metadata.get("validation_metrics", {})
    print(f"model:      {model.info.label}")
    print(f"file:       {model.path}{_file_source(args, config)}")
    print(f"sha256:     {model.sha256}")
    print(f"threshold:  {model.info.threshold:.4f} ({metadata.get('threshold_rule', 'rule not recorded')})")
    print(f"created:    {metadata.get('created', '?')}  commit {metadata.get('git_commit', '?')}")
    print(f"intended:   {_intended_use(model.info)}")
    print(f"abstains:   {_abstention(model.info)}")
    print(f"heat map:   {_saliency(model.info)}")
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece"):
        if key in metrics:
            print(f"val {key + ':':<13}{metrics[key]:.4f}")
    if site is not None:
        print(f"site:       {site}")
    if shadow is not None:
        print(f"shadow:     {shadow}")
    return 0


def _shadow(config) -> str:
    """The [shadow] model as the service would load it (a threshold chosen for another file
    stops here as it stops the service)."""
    from pacs_ai.classify.shadow import load_shadow_model
    from pacs_ai.model.intended_use import format_age_range

    shadow = load_shadow_model(config)
    own = shadow.info.metadata["threshold"]
    threshold = (f"threshold {shadow.info.threshold:.4f}"
                 + (" ([shadow] threshold)" if config.shadow.threshold is not None
                    else " (its own)"))
    age_range = shadow.info.intended_age_years
    films = ("assesses every film the live model assesses" if age_range is None else
             f"intended for {format_age_range(age_range)} years: assesses the films the live "
             "model assesses within that range (others recorded outside-intended-age)")
    return (f"{shadow.info.label} ({shadow.path}, sha256 {shadow.sha256}), {threshold}; "
            f"its file's threshold {own:.4f}; {films}, reports none")


def _saliency(info) -> str:
    """What the file's saliency map is, or that it has none (pacs_ai.model.model, contract 2)."""
    if info.saliency_grid is None:
        return "none (model contract 1: reports without region, no heat-map images)"
    rows, columns = info.saliency_grid
    method = info.metadata.get("saliency", {}).get("method", "method not recorded")
    return (f"{rows}x{columns} saliency map ({method}); reports of pneumonia carry its "
            "region, and heat-map images go with them ([report] heatmap)")


def _file_source(args: argparse.Namespace, config) -> str:
    if args.model is not None:
        return " (--model)"
    if config is None:
        return " (the shipped model)"
    if config.model.path is not None:
        return f" ([model] path in {config.source or 'the built-in config'})"
    return f" (the shipped model: no [model] path in {config.source or 'the built-in config'})"


def _site_settings(config, own, sha256: str) -> str:
    """What the config's [model] puts in force over the file's own values, as the service
    would (an impossible combination, or a threshold chosen for another model file, stops here
    as it stops the service)."""
    from pacs_ai.config import UNKNOWN_AGE_CLASSIFY
    from pacs_ai.model.intended_use import format_age_range, site_model_info
    from pacs_ai.model.site_threshold import check_binding

    settings = config.model
    check_binding(settings.site_threshold, own, sha256)
    effective = site_model_info(own, threshold=settings.threshold,
                                min_age_years=settings.min_age_years,
                                max_age_years=settings.max_age_years,
                                ood_threshold=settings.ood_threshold)
    changes = []
    if settings.threshold is not None:
        changes.append(f"threshold {effective.threshold:.4f}")
    if settings.min_age_years is not None or settings.max_age_years is not None:
        changes.append(f"ages {format_age_range(effective.intended_age_years)} years")
    if settings.ood_threshold is not None:
        changes.append(f"abstention above {effective.ood_threshold:.3f}")
    if settings.unknown_age != UNKNOWN_AGE_CLASSIFY:
        changes.append("films without an age skipped")
    where = config.source or "the built-in config"
    if not changes:
        return f"the model file's own settings ({where} overrides none)"
    return f"{', '.join(changes)} ([model] in {where}, in force instead of the above)"


def _intended_use(info) -> str:
    from pacs_ai.model.intended_use import format_age_range

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
