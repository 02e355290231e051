#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU, its driver, and PyTorch + transformers (no
# internet, maybe no Rust: build the worker here first and carry target/release/worker along).
# Runs in well under 8 minutes and prints a table last:
#
#   1. every CUDA kernel against its CPU twin on random inputs (`worker gpu-check`; fp32
#      tolerance 1e-5 relative, a NaN never passes);
#   2. 20 training steps of the tiny and MiniLM shapes on GPU vs CPU from the same weights,
#      batches and dropout keys (the first step's gradients and every loss compared), and
#      Tandem's BERT-base training tokens/s and MFU (fp32, worker/src/gpu_check.rs), a 1-rank
#      NCCL communicator through the worker's all-reduce path, and `worker train --device cuda`
#      end to end against `--device cpu`;
#   3. PyTorch's BERT-base training tokens/s and MFU on the same GPU (scripts/bench_gpu_torch.py).
#
#   scripts/gpu-check.sh            # WORKER=path/to/worker PYTHON=python3 to override
set -uo pipefail
cd "$(dirname "$0")/.."
WORKER=${WORKER:-target/release/worker}
PYTHON=${PYTHON:-python3}
if [ ! -x "$WORKER" ]; then
  if command -v cargo >/dev/null; then cargo build --release -p worker --quiet; else
    echo "gpu-check: $WORKER is missing and there is no cargo: build it elsewhere and copy it here" >&2; exit 1; fi
fi
# NVRTC, cuBLAS and the CUDA headers: the toolkit's, or the NVIDIA wheels inside Python's
# site-packages (cudarc finds libnvrtc.so.12 and libcublas.so.12 by those names).
site=$("$PYTHON" -c "import site; print(' '.join(site.getsitepackages()))" 2>/dev/null || true)
for d in $site; do
  for lib in cuda_nvrtc cublas; do
    [ -d "$d/nvidia/$lib/lib" ] && export LD_LIBRARY_PATH="$d/nvidia/$lib/lib:${LD_LIBRARY_PATH:-}"
  done
  [ -z "${TANDEM_CUDA_INCLUDE:-}" ] && [ -f "$d/nvidia/cuda_runtime/include/cuda_bf16.h" ] && export TANDEM_CUDA_INCLUDE="$d/nvidia/cuda_runtime/include"
  for nccl in "$d"/nvidia/nccl/lib/libnccl.so.2; do [ -f "$nccl" ] && found_nccl=$nccl; done
done
# cudarc looks for libnccl.so (and .so.1, .so.12, ...), never .so.2: link the name.
for nccl in ${found_nccl:-} /usr/lib/x86_64-linux-gnu/libnccl.so.2; do
  if [ -f "$nccl" ]; then
    links=$(mktemp -d); ln -s "$nccl" "$links/libnccl.so"; export LD_LIBRARY_PATH="$links:${LD_LIBRARY_PATH:-}"; break
  fi
done
[ -d /usr/local/cuda/lib64 ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64"
export TANDEM_CUDA_INCLUDE=${TANDEM_CUDA_INCLUDE:-/usr/local/cuda/include}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
ldd --version 2>/dev/null | head -1

out=$(mktemp -d)
timeout 240 "$WORKER" gpu-check > "$out/kernels.txt" 2>&1; kernels_rc=$?
cat "$out/kernels.txt"
# `worker train` end to end on the GPU and on the CPU: the tiny fixture classifier, 30 steps on a
# generated 3-class CSV, dropout on; the two runs' final train loss and test accuracy side by side.
"$PYTHON" - "$out" <<'PY'
import sys
words = ["good", "bad", "film", "movie", "funny", "boring", "story", "great", "dull", "best", "worst", "fun"]
rows = ["text,label"] + ['"%s",%s' % (" ".join(words[(i * 7 + k * 5) % 12] for k in range(3 + i % 5)),
                                       ["negative", "positive", "neutral"][i % 3]) for i in range(240)]
open(sys.argv[1] + "/train.csv", "w").write("\n".join(rows) + "\n")
PY
cat > "$out/job.toml" <<TOML
[model]
path = "$PWD/tests/fixtures/tiny-cls"
max_seq_len = 16
[data]
train = "$out/train.csv"
test = "$out/train.csv"
labels = ["negative", "positive", "neutral"]
[train]
seed = 5
epochs = 2
max_steps = 30
batch_size = 12
lr = 2e-3
TOML
for dev in cuda cpu; do
  timeout 120 "$WORKER" --device "$dev" train --config "$out/job.toml" --set "output.dir=$out/run-$dev" --no-progress \
    > "$out/train-$dev.txt" 2>&1 || { echo "worker train --device $dev failed:"; tail -5 "$out/train-$dev.txt"; }
done
timeout 240 "$PYTHON" scripts/bench_gpu_torch.py > "$out/torch.json" 2> "$out/torch.err"; torch_rc=$?
[ "$torch_rc" = 0 ] || tail -5 "$out/torch.err"

echo
echo "== GPU check: $(date -u +%Y-%m-%dT%H:%MZ) =="
# Kernel rows end in "ok"/"FAIL"; the model rows start with tiny / minilm, the NCCL row with
# nccl; Tandem's BERT-base figures are a JSON line.
kernel_rows=$(grep -vE "^(tiny|minilm|nccl|GPU|model|\{| )" "$out/kernels.txt" | grep -E "  (ok|FAIL.*)$" || true)
passed=$(printf "%s\n" "$kernel_rows" | grep -c "  ok$" || true); failed=$(printf "%s\n" "$kernel_rows" | grep -c "FAIL" || true)
if [ "$passed$failed" = 00 ]; then kernels="did not run: $(tail -1 "$out/kernels.txt")"
elif [ "$failed" = 0 ]; then kernels="all $passed ok"
else kernels="FAILED: $failed failed, $passed ok"; fi
printf "%-44s %s\n" "kernel parity (vs CPU twins)" "$kernels"
for m in tiny minilm minilm-bf16; do
  row=$(grep -E "^$m +[0-9]" "$out/kernels.txt" || true)
  if [ -n "$row" ]; then
    printf "%-44s %s\n" "training parity (20 steps), $m" "$(echo "$row" | awk '{printf "grad %s, loss %s: %s", $3, $4, $5}')"
  else
    printf "%-44s %s\n" "training parity (20 steps), $m" "did not run (see above)"
  fi
done
"$PYTHON" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def summary(dev):
    p = os.path.join(out, f"run-{dev}", "metrics.json")
    if not os.path.exists(p):
        return None
    m = json.load(open(p))
    return m["final_train_loss"], (m.get("test") or {}).get("accuracy")
g, c = summary("cuda"), summary("cpu")
label = "worker train --device cuda vs cpu (30 steps)"
if g and c:
    print(f"{label:<44} loss {g[0]:.5f} vs {c[0]:.5f}, test accuracy {g[1]:.4f} vs {c[1]:.4f}")
else:
    print(f"{label:<44} did not run (see above)")
PY
nccl=$(grep -E "^nccl 1-rank all-reduce: " "$out/kernels.txt" | sed 's/^nccl 1-rank all-reduce: //' || true)
printf "%-44s %s\n" "NCCL all-reduce, 1 rank (worker's path)" "${nccl:-did not run (see above)}"
bucketed=$(grep -E "^nccl bucketed step: " "$out/kernels.txt" | sed 's/^nccl bucketed step: //' || true)
printf "%-44s %s\n" "NCCL bucketed step vs plain step, 1 rank" "${bucketed:-did not run (see above)}"
tandem=$(grep -E '^\{"impl": "tandem"' "$out/kernels.txt" || true)
if [ -n "$tandem" ]; then
  "$PYTHON" - "$tandem" <<'PY'
import json, sys
for line in sys.argv[1].splitlines():
    r = json.loads(line)
    label = f"Tandem BERT-base {r['precision']} tokens/s, MFU"
    print(f"{label:<44} {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% (batch {r['batch']}, seq {r['seq']})")
PY
else
  printf "%-44s %s\n" "Tandem BERT-base tokens/s, MFU" "did not run (see above)"
fi
if [ "$torch_rc" = 0 ]; then
  "$PYTHON" - "$out/torch.json" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"{'PyTorch BERT-base bf16 tokens/s, MFU':<44} {r['tokens_per_s']:,} tokens/s, MFU {100 * r['mfu']:.1f}% "
      f"(batch {r['batch']}, seq {r['seq']}, {r['gpu']}, torch {r['torch']})")
PY
else
  printf "%-44s %s\n" "PyTorch BERT-base bf16 tokens/s, MFU" "failed (exit $torch_rc, see above)"
fi
rm -rf "$out"
[ "$kernels_rc" = 0 ]
