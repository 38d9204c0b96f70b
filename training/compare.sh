#!/usr/bin/env bash
# Re-runs the seed study's model family on our split and prints the comparison table.
# Usage: bash training/compare.sh [DATA_ROOT] [RUNS_DIR]   (about 20 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/chest_xray}
runs=${2:-runs}
python=${PYTHON:-.venv/bin/python}
for config in dnn-baseline dnn-hidden dnn-hidden-more-epochs dnn-hidden-dropout \
              seed-cnn-initial seed-cnn-final; do
  [ -f "$runs/$config/summary.json" ] ||
    "$python" -m training train --config "$config" --data "$data" --out "$runs/$config" --seed 0 --quiet
done
"$python" -m training table "$runs"/dnn-* "$runs"/seed-cnn-* "$runs"/pacs-cnn*
