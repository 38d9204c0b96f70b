#!/usr/bin/env bash
# Creates .venv with the service (and, with argument "dev", the test tools). Idempotent.
# torch 2.13.0 is the small CPU build; the service needs nothing more of PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
extra=""
[ "${1:-}" = dev ] && extra="[dev]"
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".${extra}"
