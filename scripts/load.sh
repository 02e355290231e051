#!/usr/bin/env bash
# The coordinator at cluster scale (docs/scale.md): builds the release coordinator and the load
# tool, then runs M simulated workers against a fresh coordinator for each size and prints the
# table, the largest size last. Arguments go to the tool (--sizes, --json, --heartbeat-timeout-s).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p coordinator --bin coordinator --example load
exec target/release/examples/load "$@"
