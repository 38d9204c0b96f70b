#!/usr/bin/env bash
# The bench at several CPU counts on one machine (issue 16 item 1): each run is restricted to
# the first N cores with taskset, so the service's `[workers] = "auto"` sees N cores, and the
# senders and the bare receiver share the same N. Usage:
#   bash bench/core_scaling.sh OUT_DIR [CORE_COUNTS] [-- extra run_bench.py arguments]
# e.g. bash bench/core_scaling.sh runs/scaling "1 2 4 8 16" -- --images 40 --concurrency 1,4
# Writes OUT_DIR/bench-<N>cores.json and .log per count; bench/scaling_table.py sums them up.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: core_scaling.sh OUT_DIR [CORE_COUNTS] [-- run_bench args]}
shift
counts=${1:-"1 2 4 8 16"}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
python=${PYTHON:-python3}
available=$(nproc --all)
mkdir -p "$out"

# The first N cores for a command: taskset where util-linux is there, else Python's own call.
pin() {
  local n=$1; shift
  if command -v taskset >/dev/null 2>&1; then
    taskset -c "0-$((n - 1))" "$@"
  else
    "$python" -c 'import os, sys; os.sched_setaffinity(0, range(int(sys.argv[1]))); os.execvp(sys.argv[2], sys.argv[2:])' "$n" "$@"
  fi
}
for n in $counts; do
  if [ "$n" -gt "$available" ]; then
    echo "skipping $n cores: this machine has $available" >&2
    continue
  fi
  echo "=== $n core(s) ==="
  pin "$n" "$python" bench/run_bench.py --json "$out/bench-${n}cores.json" "$@" \
    2>&1 | tee "$out/bench-${n}cores.log"
done
