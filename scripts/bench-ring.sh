#!/usr/bin/env bash
# The CPU all-reduce alone, ours (the TCP ring, `worker bench-ring`) and PyTorch's (gloo,
# scripts/bench_gloo.py) side by side in one run, between WORLD (default 2) processes on
# loopback, over 1, 16, 64 and 256 MiB: the median time of ITERS (default 5) all-reduces and the
# bus bandwidth 2(N-1)/N x bytes / time, with the ratio ours / gloo. Rounds alternate (ours,
# gloo, ours, gloo) so that load from other processes hits both. A benchmark, not a test.
#
#   PYTHON=/path/to/python-with-torch scripts/bench-ring.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORLD=${WORLD:-2}
ITERS=${ITERS:-5}
ROUNDS=${ROUNDS:-2}
SIZES=${SIZES:-1,16,64,256}
PYTHON=${PYTHON:-python3}
cargo build --release -p worker --quiet
have_torch=1
"$PYTHON" -c "import torch.distributed as d; assert d.is_gloo_available()" 2>/dev/null || have_torch=0
[ "$have_torch" = 1 ] || echo "bench-ring: $PYTHON has no torch with gloo: the gloo column is skipped"
results=$(mktemp)

ours() {
  local ports pids=()
  ports=$(python3 -c "
import socket
socks = [socket.socket() for _ in range($WORLD)]
for s in socks: s.bind(('127.0.0.1', 0))
print(','.join(f'127.0.0.1:{s.getsockname()[1]}' for s in socks))
for s in socks: s.close()")
  for r in $(seq 1 $((WORLD - 1))); do
    RAYON_NUM_THREADS=1 target/release/worker bench-ring --rank "$r" --peers "$ports" --sizes-mib "$SIZES" --iters "$ITERS" > /dev/null 2>&1 &
    pids+=($!)
  done
  RAYON_NUM_THREADS=1 target/release/worker bench-ring --rank 0 --peers "$ports" --sizes-mib "$SIZES" --iters "$ITERS" 2>/dev/null >> "$results"
  wait "${pids[@]}"
}

for _ in $(seq "$ROUNDS"); do
  ours
  if [ "$have_torch" = 1 ]; then
    "$PYTHON" scripts/bench_gloo.py --world "$WORLD" --sizes-mib "$SIZES" --iters "$ITERS" 2>/dev/null >> "$results"
  fi
done

python3 - "$results" "$WORLD" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
world = sys.argv[2]
by = {}
for r in rows:
    by.setdefault((r["impl"], r["mib"]), []).append(r["bus_gb_per_s"])
sizes = sorted({r["mib"] for r in rows})
print(f"all-reduce between {world} processes on loopback, bus bandwidth GB/s (median of rounds)")
print(f"{'MiB':>6} {'tandem ring':>12} {'gloo':>8} {'ratio':>7}")
for mib in sizes:
    ours = statistics.median(by[("tandem-ring", mib)])
    gloo = by.get(("gloo", mib))
    g = statistics.median(gloo) if gloo else None
    gs = "-" if g is None else f"{g:.3f}"
    ratio = "-" if g is None else f"{ours / g:.2f}"
    print(f"{mib:>6} {ours:>12.3f} {gs:>8} {ratio:>7}")
PY
