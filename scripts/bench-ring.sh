#!/usr/bin/env bash
# The CPU ring all-reduce alone, between WORLD (default 2) worker processes on loopback, over
# 1, 16, 64 and 256 MiB: prints the median time and the bus bandwidth 2(N-1)/N x bytes / time.
# A benchmark, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
WORLD=${WORLD:-2}
cargo build --release -p worker --quiet
ports=$(python3 -c "
import socket
socks = [socket.socket() for _ in range($WORLD)]
for s in socks: s.bind(('127.0.0.1', 0))
print(','.join(f'127.0.0.1:{s.getsockname()[1]}' for s in socks))
for s in socks: s.close()")
pids=()
for r in $(seq 1 $((WORLD - 1))); do
  target/release/worker bench-ring --rank "$r" --peers "$ports" "$@" > /dev/null &
  pids+=($!)
done
target/release/worker bench-ring --rank 0 --peers "$ports" "$@"
wait "${pids[@]}"
