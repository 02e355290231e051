#!/usr/bin/env bash
# 1 worker vs 2 workers on the same global batch, ours and PyTorch DDP side by side in one run:
# fine-tuning the packaged MiniLM on Rotten Tomatoes (configs/rotten-tomatoes.toml: global batch
# 32, max_seq_len 64, dropout on) for STEPS steps (default 30) on this machine's cores (split
# between the workers). Prints real tokens/s after WARMUP steps (default 5), and for ours the
# time each step spends in the gradient all-reduce (on the all-reduce thread, overlapped with
# backward) and the part of it the step waited for after backward. A benchmark, not a test.
#
#   PYTHON=/path/to/python-with-torch scripts/bench-workers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-5}
PYTHON=${PYTHON:-python3}
scripts/fetch-assets.sh > /dev/null
cargo build --release -p worker -p coordinator --quiet
have_torch=1
"$PYTHON" -c "import torch, transformers" 2>/dev/null || have_torch=0
[ "$have_torch" = 1 ] || echo "bench-workers: $PYTHON has no torch/transformers: the PyTorch column is skipped"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The job without its evaluation splits: only training steps are timed.
grep -vE '^(dev|test) *=' configs/rotten-tomatoes.toml > "$tmp/job.toml"
results="$tmp/results"

ours() {
  local world=$1 out="$tmp/w$1"
  rm -rf "$out"
  target/release/coordinator --world-size "$world" --config "$tmp/job.toml" --listen 127.0.0.1:0 --spawn-local \
    --no-progress --set "train.max_steps=$STEPS" --set checkpoint.every=0 --set checkpoint.best_metric= \
    --set "output.dir=$out" > /dev/null 2>&1
  python3 - "$out/loss.jsonl" "$world" "$WARMUP" >> "$results" <<'PY'
import json, sys
recs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    recs[r["step"]] = r
world, warm = int(sys.argv[2]), int(sys.argv[3])
steps = sorted(recs)
timed = [recs[s] for s in steps if s > warm]
seconds = timed[-1]["time_s"] - recs[warm]["time_s"]
print(json.dumps({
    "impl": "tandem", "world": world, "steps": len(timed),
    "step_s": round(seconds / len(timed), 4),
    "tokens_per_s": round(sum(r["tokens"] for r in timed) / seconds, 1),
    "allreduce_ms": round(1e3 * sum(r["allreduce_s"] for r in timed) / len(timed), 1),
    "allreduce_exposed_ms": round(1e3 * sum(r["allreduce_wait_s"] for r in timed) / len(timed), 1),
}))
PY
}

for world in 1 2; do
  ours "$world"
  if [ "$have_torch" = 1 ]; then
    "$PYTHON" scripts/bench_ddp_torch.py --world "$world" --steps "$STEPS" --warmup "$WARMUP" 2>/dev/null >> "$results"
  fi
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
get = lambda impl, w: next((r for r in rows if r["impl"] == impl and r["world"] == w), None)
print("MiniLM on Rotten Tomatoes, global batch 32, max_seq_len 64, dropout on; real tokens/s")
print(f"{'workers':>7} {'tandem':>9} {'all-reduce ms/step':>19} {'exposed ms':>11} {'pytorch ddp':>12} {'ratio':>6}")
for w in (1, 2):
    o, t = get("tandem", w), get("pytorch-ddp-gloo", w)
    ts = "-" if t is None else f"{t['tokens_per_s']:.0f}"
    ratio = "-" if t is None else f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}"
    print(f"{w:>7} {o['tokens_per_s']:>9.0f} {o['allreduce_ms']:>19.1f} {o['allreduce_exposed_ms']:>11.1f} {ts:>12} {ratio:>6}")
PY
