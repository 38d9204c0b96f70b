#!/usr/bin/env bash
# The shipped model's recipe end to end, and the ablations of docs/generalisation.md:
# three pacs-cnn-robust members on one patient-grouped split (split seed 0, weight seeds 0-2),
# the resolution-only ablation (pacs-cnn-lowres), the ensemble (threshold by the shift rule,
# out-of-distribution score), then the stress test of every model and the ensemble's abstention.
# Usage: bash training/robust.sh [DATA_ROOT] [RUNS_DIR] [VERSION]
# Time on the project's 2-core CPU machine: about 25-35 min per robust member, 12 min for the
# ablation, 5 min for the ensemble and its stress test, 2 min per further stress test.
# Finished runs are kept: running it again does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/chest_xray}
runs=${2:-runs}
version=${3:-dev}
python=${PYTHON:-.venv/bin/python}
train() {  # config, run name, weight seed
  [ -f "$runs/$2/summary.json" ] ||
    "$python" -m training train --config "$1" --data "$data" --out "$runs/$2" --seed "$3" \
      --split-seed 0 --quiet --version "$version"
}
for seed in 0 1 2; do train pacs-cnn-robust "robust-s$seed" "$seed"; done
train pacs-cnn-lowres lowres-s0 0
[ -f "$runs/ensemble/model.pt" ] ||
  "$python" -m training ensemble --runs "$runs"/robust-s0 "$runs"/robust-s1 "$runs"/robust-s2 \
    --data "$data" --out "$runs/ensemble" --version "$version"
for model in "$runs"/robust-s0 "$runs"/robust-s1 "$runs"/robust-s2 "$runs"/lowres-s0; do
  [ -f "$model/stress/stress.json" ] ||
    "$python" -m training stress --model "$model/model.pt" --data "$data" --out "$model/stress"
done
"$python" -m training abstention --model "$runs/ensemble/model.pt" --data "$data" \
  --out "$runs/ensemble/abstention"
cat "$runs"/ensemble/stress.md "$runs"/ensemble/abstention/abstention.md
