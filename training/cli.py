"""`python -m training train|evaluate|stress|abstention|ensemble|export|table`.

  train     train one named configuration on ROOT/train (validation split carved from it by
            patient), write the run folder with its report and model.pt
  evaluate  run a model file (through the service's contract) on a folder split and write a report
  stress    the validation split under acquisition shifts (crop, borders, blur, markers...):
            AUC, sensitivity, specificity per condition at the model's threshold, and the worst
  ensemble  several runs of one split as one model file (mean logit), with the out-of-distribution
            score fitted on their training films and the threshold rule applied to the ensemble
  export    copy a run's model into a model file with a release version (the shipped model)
  gate      train one member of the gate: a small network that tells a young child's frontal
            chest film from adult films and made-up pictures (training.gate)
  gate-check  a gate's (or a model file's) abstention on children's and adult validation films,
            shifted, restyled, turned, and on made-up pictures (training.gate_check)
  gated-model  a released classifier file behind trained gate members, as one model file
  finetune  one member of a released ensemble trained further on two views of each film, with a
            penalty on their logits' difference (training.finetune)
  table     the comparison table (markdown) of several runs' validation figures
  add-saliency  re-export an ensemble model file with its saliency method (contract 2): the same
            weights and metadata under a new version, checked to give the same outputs
  explain   the deletion check of a model's saliency maps on its validation split's pneumonia
            films: does removing the reported region lower the score more than a random one?
            (--lungs: and how often does the region lie over the lung fields?)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest_xray"
DEFAULT_ADULTS = DEFAULT_DATA.parent / "adults_nih"
SAMPLE_DICOMS = Path(__file__).resolve().parent.parent / "sample_dicoms"
SHIPPED_SPLIT = (Path(__file__).resolve().parent.parent / "deploy" / "models"
                 / "pacs-ai-pneumonia.split.json")


def build_parser() -> argparse.ArgumentParser:
    from training.models import CONFIGS

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a named configuration")
    train.add_argument("--config", required=True, choices=sorted(CONFIGS))
    train.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chest_xray root folder")
    train.add_argument("--out", type=Path, required=True, help="run folder to create")
    train.add_argument("--seed", type=int, default=0, help="seeds the split, weights and order")
    train.add_argument("--split-seed", type=int,
                       help="seed of the validation split only (default: --seed); ensemble "
                            "members share one split and differ in --seed")
    train.add_argument("--epochs", type=int, help="override the configuration's epochs")
    train.add_argument("--validation-fraction", type=float, default=0.15)
    train.add_argument("--limit-per-class", type=int, help="first N images per class (smoke runs)")
    train.add_argument("--version", default="dev", help="version written into the model file")
    train.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--device", default="cpu",
                       help="torch device for the network and batches, e.g. cuda (default: cpu)")

    evaluate = commands.add_parser("evaluate", help="evaluate a model file on a folder split")
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, default=DEFAULT_DATA)
    evaluate.add_argument("--split", default="val", help="sub-folder of --data (never tune on test)")
    evaluate.add_argument("--out", type=Path, required=True)

    stress = commands.add_parser("stress", help="the validation split under acquisition shifts")
    stress.add_argument("--model", type=Path, required=True)
    stress.add_argument("--data", type=Path, default=DEFAULT_DATA)
    stress.add_argument("--split-file", type=Path,
                        help="split.json naming the validation films (default: MODEL.split.json "
                             "beside a released model, or the split.json of its run folder)")
    stress.add_argument("--out", type=Path, required=True)
    stress.add_argument("--conditions", help="comma-separated condition names (default: all)")
    stress.add_argument("--limit-per-class", type=int, help="first N films per class (smoke runs)")
    stress.add_argument("--unseen-processing", action="store_true",
                        help="under processing no training or threshold saw "
                             "(training.unseen_processing) instead of the stress conditions")

    abstention = commands.add_parser("abstention", help="abstention rates of a model file with "
                                     "an out-of-distribution score on what the project has")
    abstention.add_argument("--model", type=Path, required=True)
    abstention.add_argument("--data", type=Path, default=DEFAULT_DATA)
    abstention.add_argument("--samples", type=Path,
                            default=Path(__file__).resolve().parent.parent / "sample_dicoms")
    abstention.add_argument("--originals", type=Path,
                            default=DEFAULT_DATA.parent / "originals")
    abstention.add_argument("--out", type=Path, required=True)

    stress_table = commands.add_parser("stress-table", help="compare stress runs (markdown)")
    stress_table.add_argument("runs", nargs="+", type=Path,
                              help="stress output folders (holding stress.json)")
    stress_table.add_argument("--threshold", type=float,
                              help="rescore every run at this threshold instead of its model's")

    ensemble = commands.add_parser("ensemble", help="several runs as one model file")
    ensemble.add_argument("--runs", type=Path, nargs="+", required=True)
    ensemble.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ensemble.add_argument("--out", type=Path, required=True,
                          help="folder for the report, summary and model.pt")
    ensemble.add_argument("--version", default="dev")
    ensemble.add_argument("--name", default="pacs-ai-pneumonia")
    ensemble.add_argument("--age-years", type=float, nargs=2, metavar=("MIN", "MAX"),
                          default=(1, 5), help="intended ages in years stored in the model file "
                                               "(default 1 5: the training data's children)")

    export = commands.add_parser("export", help="release a run's model file under a version")
    export.add_argument("--run", type=Path, required=True)
    export.add_argument("--output", type=Path, required=True)
    export.add_argument("--version", required=True)
    export.add_argument("--name", default="pacs-ai-pneumonia")
    export.add_argument("--rethreshold", action="store_true",
                        help="apply the current threshold rule to the run's validation "
                             "probabilities first (rewrites its report/ and summary.json)")
    export.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="chest_xray root, for the validation labels with --rethreshold")

    saliency = commands.add_parser("add-saliency", help="re-export an ensemble model file with "
                                   "its saliency method, same weights, new version")
    saliency.add_argument("--model", type=Path, required=True, help="the ensemble model file")
    saliency.add_argument("--output", type=Path, required=True)
    saliency.add_argument("--version", required=True)

    explain = commands.add_parser("explain", help="deletion check of the saliency maps")
    explain.add_argument("--model", type=Path, required=True)
    explain.add_argument("--data", type=Path, default=DEFAULT_DATA)
    explain.add_argument("--split-file", type=Path,
                         help="split.json naming the validation films (default: MODEL.split.json "
                              "beside a released model, or the split.json of its run folder)")
    explain.add_argument("--out", type=Path, help="folder for explain.json (per-film figures)")
    explain.add_argument("--start", type=int, default=0,
                         help="skip the first N films (in file-name order)")
    explain.add_argument("--limit", type=int, help="at most N films (after --start)")
    explain.add_argument("--seed", type=int, default=0, help="seeds the random regions")
    explain.add_argument("--lungs", action="store_true",
                         help="also: how often the region lies over the lung fields (a fixed "
                              "estimate, training/lung_fields.py)")
    explain.add_argument("--threads", type=int, help="torch threads (default: torch's)")

    gate = commands.add_parser("gate", help="train one member of the gate (is this a young "
                               "child's frontal chest film?)")
    gate.add_argument("--out", type=Path, required=True, help="run folder to create")
    gate.add_argument("--seed", type=int, default=0, help="seeds the weights, batches and augmentation")
    gate.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chest_xray root folder")
    gate.add_argument("--adults", type=Path, default=DEFAULT_ADULTS,
                      help="adult films in NORMAL/ and PNEUMONIA/ (shared/data/adults_nih)")
    gate.add_argument("--split-file", type=Path, default=SHIPPED_SPLIT,
                      help="the classifier's split.json: its training films are the gate's "
                           "(default: the shipped model's)")
    gate.add_argument("--adult-split-seed", type=int, default=0)
    gate.add_argument("--epochs", type=int, help="override the recipe's epochs")
    gate.add_argument("--steps-per-epoch", type=int, help="override the recipe's steps per epoch")
    gate.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")

    check = commands.add_parser("gate-check", help="abstention of a gate on children's and "
                                "adult validation films, shifted, restyled and made up")
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, nargs="+", help="gate run folders (an ensemble)")
    source.add_argument("--model", type=Path, help="a model file: its own out-of-distribution "
                        "score and threshold")
    check.add_argument("--out", type=Path, required=True)
    check.add_argument("--data", type=Path, default=DEFAULT_DATA)
    check.add_argument("--adults", type=Path, default=DEFAULT_ADULTS)
    check.add_argument("--split-file", type=Path, default=SHIPPED_SPLIT)
    check.add_argument("--samples", type=Path, default=SAMPLE_DICOMS)
    check.add_argument("--originals", type=Path, default=DEFAULT_DATA.parent / "originals")

    gated = commands.add_parser("gated-model", help="a classifier model file behind trained "
                                "gate members, as one model file")
    gated.add_argument("--classifier", type=Path, required=True,
                       help="a released model file (its weights and threshold are kept)")
    gated.add_argument("--gates", type=Path, nargs="+", required=True, help="gate run folders")
    gated.add_argument("--version", required=True)
    gated.add_argument("--output", type=Path, required=True)
    gated.add_argument("--data", type=Path, default=DEFAULT_DATA)
    gated.add_argument("--adults", type=Path, default=DEFAULT_ADULTS)

    finetune = commands.add_parser("finetune", help="fine-tune one member of a released ensemble "
                                   "on two views of each film with a logit-consistency penalty")
    finetune.add_argument("--model", type=Path, required=True, help="a released ensemble file")
    finetune.add_argument("--member", type=int, required=True, help="which member (0-based)")
    finetune.add_argument("--out", type=Path, required=True, help="run folder to create")
    finetune.add_argument("--data", type=Path, default=DEFAULT_DATA)
    finetune.add_argument("--seed", type=int, default=0, help="seeds the batches and views")
    finetune.add_argument("--epochs", type=int, help="override the recipe's epochs")
    finetune.add_argument("--consistency", type=float, help="override the penalty's weight")
    finetune.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")

    table = commands.add_parser("table", help="markdown table of several runs")
    table.add_argument("runs", nargs="+", type=Path)
    return parser


def command_train(args: argparse.Namespace) -> int:
    import torch

    from training.data import load_pictures, load_split
    from training.models import CONFIGS
    from training.split import make_split, save_split
    from training.train import train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    images = load_split(args.data, "train", limit_per_class=args.limit_per_class,
                        progress=not args.quiet)
    if config.augment_pictures:
        images = load_pictures(images, progress=not args.quiet)
    split_seed = args.seed if args.split_seed is None else args.split_seed
    split = make_split(images, args.validation_fraction, split_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    save_split(split, images, args.out / "split.json", split_seed)
    data_description = {
        "source": "Kermany et al. 2018 pediatric chest X-ray (CC BY 4.0), official train/ only",
        "train_images": len(split["train"]), "validation_images": len(split["validation"]),
        "validation_fraction": args.validation_fraction, "split_seed": split_seed,
    }
    metrics = train_run(config, images.subset(split["train"]), images.subset(split["validation"]),
                        args.out, seed=args.seed, epochs=args.epochs, version=args.version,
                        data_description=data_description, progress=not args.quiet,
                        device=args.device)
    print(json.dumps({"run": str(args.out), "threshold": metrics["threshold"],
                      "val_auc": metrics["roc_auc"], "val_accuracy": metrics["accuracy"],
                      "val_sensitivity": metrics["sensitivity"],
                      "training_seconds": round(metrics["training_seconds"], 1)}))
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from pacs_ai.evaluate.offline_classification import classify_files
    from pacs_ai.model.model import PneumoniaModel
    from training.data import list_split
    from training.report import write_report

    model = PneumoniaModel.load(args.model)
    items = list_split(args.data, args.split)
    results = list(classify_files([p for p, _ in items], model))
    failed = [r for r in results if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} images could not be classified, e.g. {failed[0]}", file=sys.stderr)
        return 1
    abstained = [r for r in results if r["status"] == "skipped"]
    if abstained:  # the model abstained (out-of-distribution): figures over the others
        print(f"{len(abstained)} of {len(results)} images abstained on, e.g. "
              f"{abstained[0]['reason']}", file=sys.stderr)
    kept = [index for index, r in enumerate(results) if r["status"] == "ok"]
    probabilities = np.array([results[i]["probability"] for i in kept])
    labels = np.array([items[i][1] for i in kept])
    metrics = write_report(args.out, probabilities, labels, model.info.threshold,
                           title=f"{args.split}")
    print(json.dumps({k: metrics[k] for k in ("count", "accuracy", "sensitivity", "specificity",
                                              "roc_auc", "ece")}))
    return 0


def command_stress(args: argparse.Namespace) -> int:
    from training.stress import run_stress

    names = args.conditions.split(",") if args.conditions else None
    summary = run_stress(args.model, args.data, args.out, args.split_file, names,
                         args.limit_per_class, unseen_processing=args.unseen_processing)
    print((args.out / "stress.md").read_text())
    print(json.dumps({"worst": summary["worst"], "mean_shifted": summary["mean_shifted"]}))
    return 0


def command_abstention(args: argparse.Namespace) -> int:
    from training.abstention import run_abstention

    run_abstention(args.model, args.data, args.out, args.samples, args.originals)
    print((args.out / "abstention.md").read_text())
    return 0


def command_stress_table(args: argparse.Namespace) -> int:
    from training.stress import comparison_table, rescore

    rows = []
    for run in args.runs:
        summary = (rescore(run / "stress.json", args.threshold) if args.threshold is not None
                   else json.loads((run / "stress.json").read_text()))
        label = json.loads((run / "stress.json").read_text()).get("model_label", run.name)
        rows.append((f"{label} ({run})", summary))
    print(comparison_table(rows), end="")
    return 0


def command_ensemble(args: argparse.Namespace) -> int:
    from training.ensemble import build_ensemble

    intended_use = {"age_years": list(args.age_years), "views": ["PA", "AP"]}
    summary = build_ensemble(args.runs, args.data, args.out, args.version, args.name,
                             intended_use)
    print(json.dumps(summary))
    return 0


def command_export(args: argparse.Namespace) -> int:
    import torch

    from pacs_ai.model.model import PneumoniaModel
    from training.export import build_metadata, export_model
    from training.models import CONFIGS, build_network

    source = PneumoniaModel.load(args.run / "model.pt").info.metadata
    config = CONFIGS[source["training"]["config"]]
    network = build_network(config)
    network.load_state_dict(torch.load(args.run / "checkpoint.pt", weights_only=True))
    kept = {k: v for k, v in source.items()
            if k not in ("format", "name", "version", "classes", "positive_class", "input",
                         "output", "threshold", "threshold_rule", "created", "git_commit")}
    threshold, rule = source["threshold"], source["threshold_rule"]
    if args.rethreshold:
        threshold, rule, kept["validation_metrics"] = rethreshold_run(args.run, args.data)
    metadata = build_metadata(name=args.name, version=args.version, threshold=threshold,
                              threshold_rule=rule, output=source["output"], **kept)
    metadata["git_commit"] = source["git_commit"]  # the commit that trained it, not this one
    export_model(network, args.output, metadata)
    shutil.copy(args.run / "split.json", args.output.with_suffix(".split.json"))
    print(f"wrote {args.output}")
    return 0


SUMMARY_KEYS = ("accuracy", "sensitivity", "specificity", "roc_auc",
                "sensitivity_at_specificity_0.90", "ece", "count")


def rethreshold_run(run: Path, data: Path) -> tuple[float, str, dict]:
    """The current THRESHOLD_RULE on a finished run's stored validation probabilities (the
    weights are untouched); rewrites the run's report/ and summary.json to match."""
    import numpy as np

    from training.data import list_split
    from training.report import THRESHOLD_RULE, choose_threshold, write_report

    probabilities = np.load(run / "validation_probabilities.npy")
    names = json.loads((run / "split.json").read_text())["validation"]
    label_of: dict[str, int] = {}
    for path, label in list_split(data, "train"):
        if label_of.setdefault(path.name, label) != label:
            raise SystemExit(f"{path.name} is in both classes of {data}/train")
    labels = np.array([label_of[name] for name in names])
    if len(labels) != len(probabilities):
        raise SystemExit(f"{run}: {len(probabilities)} probabilities for {len(labels)} images")
    threshold = choose_threshold(probabilities, labels)
    history = json.loads((run / "history.json").read_text())
    metrics = write_report(run / "report", probabilities, labels, threshold, history,
                           title=run.name)
    summary = {key: metrics[key] for key in SUMMARY_KEYS}
    stored = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**stored, "threshold": threshold, **summary},
                                                 indent=2))
    print(json.dumps({"run": str(run), "threshold": threshold, **summary}))
    return threshold, THRESHOLD_RULE, summary


def command_add_saliency(args: argparse.Namespace) -> int:
    from training.ensemble import with_saliency

    print(json.dumps(with_saliency(args.model, args.output, args.version)))
    split = args.model.with_suffix(".split.json")
    if split.is_file() and split != args.output.with_suffix(".split.json"):
        shutil.copy(split, args.output.with_suffix(".split.json"))
    return 0


def command_explain(args: argparse.Namespace) -> int:
    from training.explain import run_explain

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = run_explain(args.model, args.data, args.out, args.split_file, args.limit,
                          args.seed, start=args.start, lungs=args.lungs)
    print(json.dumps(summary, indent=2))
    return 0


def command_gate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from training.gate import GateRecipe, load_gate_data, train_gate

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = GateRecipe()
    overrides = {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v})
    data, record = load_gate_data(args.split_file, args.data, args.adults, args.adult_split_seed)
    summary = train_gate(data, args.out, args.seed, recipe, record)
    print(json.dumps(summary))
    return 0


def command_gate_check(args: argparse.Namespace) -> int:
    import numpy as np

    from training.data import load_pictures, load_split
    from training.gate import (adult_split, gate_scores, load_gate_member, log_amplitude_profile,
                               threshold_for)
    from training.gate_check import check_sets, markdown, summarise
    from training.stress import validation_files

    children, _ = validation_files(args.split_file, args.data)
    adults_all = load_pictures(load_split(args.adults.parent, args.adults.name, progress=False),
                               progress=False)
    if args.runs:
        gates = [load_gate_member(run) for run in args.runs]
        seed = json.loads((args.runs[0] / "split.json").read_text())["adult_split_seed"]
        styles = dict(np.load(args.runs[0] / "styles.npz"))

        def score(inputs):
            return gate_scores(gates, inputs)
        label = "gate " + " + ".join(str(run) for run in args.runs)
    else:
        from pacs_ai.model.model import PneumoniaModel

        model = PneumoniaModel.load(args.model)
        if model.info.ood_threshold is None:
            raise SystemExit(f"{args.model} has no out-of-distribution score")
        seed = 0
        children_train = load_pictures(load_split(
            args.data, "train", progress=False,
            names=set(json.loads(args.split_file.read_text())["train"])), progress=False)
        styles = None

        def score(inputs):
            return model.assess(inputs)[1]
        label = model.info.label
    split = adult_split(adults_all, seed)
    by_name = {path.name: path for path in adults_all.paths}
    adults = [by_name[name] for name in split["validation"]]
    if styles is None:
        train_index = [i for i, p in enumerate(adults_all.paths) if p.name in set(split["train"])]
        styles = {"children": log_amplitude_profile(children_train.pictures),
                  "adults": log_amplitude_profile(adults_all.pictures[train_index])}
    table = check_sets(score, children, adults, styles, args.samples, args.originals)
    if args.runs:
        from training.shifts import CONDITIONS

        threshold = threshold_for({c.name: table[f"children {c.name}"]["scores"]
                                   for c in CONDITIONS})
    else:
        threshold = model.info.ood_threshold
    rows = summarise(table, threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate.json").write_text(json.dumps(
        {"label": label, "threshold": threshold, "sets": rows}, indent=2))
    np.savez_compressed(args.out / "gate_scores.npz",
                        **{name: row["scores"] for name, row in table.items()})
    (args.out / "gate.md").write_text(markdown(rows, threshold, label))
    print((args.out / "gate.md").read_text())
    return 0


def command_gated_model(args: argparse.Namespace) -> int:
    from training.gated_model import build_gated_model

    ood = build_gated_model(args.classifier, args.gates, args.version, args.output, args.data,
                            args.adults)
    print(json.dumps(ood, indent=2))
    return 0


def command_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from training.finetune import FinetuneRecipe, run_finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"epochs": args.epochs, "consistency": args.consistency}
    recipe = dataclasses.replace(FinetuneRecipe(),
                                 **{k: v for k, v in overrides.items() if v is not None})
    print(json.dumps(run_finetune(args.model, args.member, args.data, args.out, args.seed,
                                  recipe)))
    return 0


def command_table(args: argparse.Namespace) -> int:
    rows = [json.loads((run / "summary.json").read_text()) for run in args.runs]
    print("| configuration | epochs | val accuracy @0.5 | val AUC | threshold | val accuracy | "
          "sensitivity | specificity | sens @ spec 0.90 | ECE | train time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['epochs']} | {row['accuracy_at_0.5']:.3f} | "
              f"{row['roc_auc']:.3f} | {row['threshold']:.3f} | {row['accuracy']:.3f} | "
              f"{row['sensitivity']:.3f} | {row['specificity']:.3f} | "
              f"{row['sensitivity_at_specificity_0.90']:.3f} | {row['ece']:.3f} | "
              f"{row['training_seconds'] / 60:.1f} min |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": command_train, "evaluate": command_evaluate, "stress": command_stress,
               "stress-table": command_stress_table,
               "ensemble": command_ensemble, "abstention": command_abstention,
               "export": command_export,
               "add-saliency": command_add_saliency, "explain": command_explain,
               "gate": command_gate, "gate-check": command_gate_check,
               "gated-model": command_gated_model, "finetune": command_finetune,
               "table": command_table}[args.command]
    return handler(args)
