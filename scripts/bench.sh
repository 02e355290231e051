#!/usr/bin/env bash
# The CPU benchmark, Tandem and PyTorch side by side in one run, ending with the ratios
# (scripts/bench.py says what it measures). Fetches the model and data, builds the release
# binaries, and uses $PYTHON, else python3, when it has torch and transformers; otherwise it
# installs them into a throwaway virtual environment in .cache/bench-venv (several GB: the
# torch wheels carry CUDA libraries). About 25 minutes on 2 cores; --quick for 2 pairs.
#
#   scripts/bench.sh [--quick] [--pairs N] [--only ceiling,step,job,ring] [--raw FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh > /dev/null
has_torch() { "$1" -c "import torch, transformers" 2>/dev/null; }
PYTHON=${PYTHON:-python3}
if ! has_torch "$PYTHON"; then
  PYTHON=.cache/bench-venv/bin/python
  if ! has_torch "$PYTHON"; then
    echo "bench: installing torch and transformers into .cache/bench-venv" >&2
    python3 -m venv .cache/bench-venv
    .cache/bench-venv/bin/pip install --quiet torch transformers
  fi
fi
cargo build --release -p worker -p coordinator --quiet
exec python3 scripts/bench.py --python "$PYTHON" "$@"
