#!/usr/bin/env bash
# CPU benchmark, ours vs PyTorch side by side in one run: forward+backward tokens/s of BERT at
# sequence length 128, batch 32, fp32, for the tiny shape (2 layers, hidden 128, vocab 30522) and
# the MiniLM shape (6 layers, hidden 384). Runs alternate (ours, theirs, ours, theirs) so that
# load from other processes hits both; the median of each is reported with the ratio.
# A benchmark, not a test: it never fails on speed.
#
#   PYTHON=/path/to/python-with-torch scripts/bench-cpu.sh [--dropout]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
cargo build --release -p worker --quiet
have_torch=1
"$PYTHON" -c "import torch, transformers" 2>/dev/null || have_torch=0
[ "$have_torch" = 1 ] || echo "bench-cpu: $PYTHON has no torch/transformers: PyTorch column skipped (pip install torch transformers)"
threads=$(nproc)
results=$(mktemp)
for preset in tiny minilm; do
  steps=5; [ "$preset" = minilm ] && steps=3
  for r in $(seq "$ROUNDS"); do
    RAYON_NUM_THREADS=$threads target/release/worker bench --preset "$preset" --steps "$steps" "$@" 2>/dev/null >> "$results"
    if [ "$have_torch" = 1 ]; then
      "$PYTHON" scripts/bench_torch.py --preset "$preset" --steps "$steps" --threads "$threads" "$@" 2>/dev/null >> "$results"
    fi
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'shape':8} {'tandem tok/s':>13} {'pytorch tok/s':>14} {'ratio':>7}   (batch 32, seq 128, fp32, fwd+bwd, median of runs)")
for preset in ("tiny", "minilm"):
    ours = [r["tokens_per_s"] for r in rows if r["impl"] == "tandem" and r["preset"] == preset]
    theirs = [r["tokens_per_s"] for r in rows if r["impl"] == "pytorch" and r["preset"] == preset]
    o = statistics.median(ours) if ours else float("nan")
    t = statistics.median(theirs) if theirs else float("nan")
    print(f"{preset:8} {o:13.0f} {t:14.0f} {o / t if theirs else float('nan'):7.2f}")
torch_v = next((r["torch"] for r in rows if r["impl"] == "pytorch"), None)
if torch_v:
    print(f"pytorch {torch_v}, threads {rows[0]['threads']}")
PY
rm -f "$results"
