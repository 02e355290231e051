#!/usr/bin/env bash
# Fetches NVRTC and the CUDA runtime headers (scripts/cuda-tools.txt: NVIDIA's x86_64 Linux
# wheels, pinned) with `pip download`, and lays them out for the kernel compile checks:
#
#   .cache/cuda/lib/       libnvrtc.so.12, libnvrtc-builtins.so.12.9
#   .cache/cuda/include/   cuda_fp16.h, cuda_bf16.h, ... (NVRTC does not bundle them)
#
# Then: LD_LIBRARY_PATH=.cache/cuda/lib TANDEM_CUDA_INCLUDE=.cache/cuda/include (scripts/test.sh
# sets both). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cache=.cache/wheels
out=.cache/cuda
mkdir -p "$cache"
if [ -f "$out/.done" ]; then exit 0; fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "fetch-cuda-tools: the pinned NVRTC wheels are for Linux x86_64; skipped on $(uname -sm)" >&2
  exit 0
fi
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  --platform manylinux2014_x86_64 -r scripts/cuda-tools.txt -d "$cache"
"$PYTHON" - "$cache" "$out" <<'PY'
import os, sys, zipfile, glob
cache, out = sys.argv[1], sys.argv[2]
for pattern, prefix, dest in [
    ("nvidia_cuda_nvrtc_cu12-12.9.86-*.whl", "nvidia/cuda_nvrtc/lib/", "lib"),
    ("nvidia_cuda_runtime_cu12-12.9.79-*.whl", "nvidia/cuda_runtime/include/", "include"),
]:
    (wheel,) = glob.glob(os.path.join(cache, pattern))
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/") and ".alt." not in name:
                target = os.path.join(out, dest, name[len(prefix):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target + ".tmp", "wb") as f:
                    f.write(z.read(name))
                os.replace(target + ".tmp", target)
open(os.path.join(out, ".done"), "w").close()
print(f"fetch-cuda-tools: NVRTC and CUDA headers in {out}")
PY
