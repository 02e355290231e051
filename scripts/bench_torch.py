#!/usr/bin/env python3
"""The PyTorch peer of `worker bench`: the full training step (zero_grad(set_to_none=True),
forward, backward, clip_grad_norm_, AdamW) of transformers' BertForSequenceClassification on
random tokens, same shapes, same thread count, fp32 or bf16 autocast. Prints one JSON line like
`worker bench`.

PyTorch at its best: nothing is padded, so no attention mask is passed; with --attn auto (the
default) both sdpa and eager attention are timed for a few steps after warm-up and the faster
one is used for the timed steps (the line says which).

    python scripts/bench_torch.py --preset minilm --batch 32 --seq 128 --steps 5 [--precision bf16]

With --ceiling instead: the machine's GEMM rate through PyTorch (MKL/oneDNN) at 4096x384x1536,
f32 and bf16, on the same threads: the ceiling model FLOP/s are measured against.
"""
import argparse
import contextlib
import json
import resource
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

PRESETS = {"tiny": (2, 128, 2, 512), "minilm": (6, 384, 12, 1536)}

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="minilm", choices=PRESETS)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--dropout", action="store_true")
ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
ap.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager"])
ap.add_argument("--ceiling", action="store_true")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)


def gemm_gflops(dtype, m=4096, k=384, n=1536, reps=20):
    x, w = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        x @ w
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        x @ w
        runs.append(time.perf_counter() - t)
    return 2 * m * k * n / sorted(runs)[reps // 2] / 1e9


if a.ceiling:
    print(json.dumps({"impl": "pytorch-gemm", "threads": torch.get_num_threads(),
                      "fp32_gflops": round(gemm_gflops(torch.float32), 1),
                      "bf16_gflops": round(gemm_gflops(torch.bfloat16), 1), "torch": torch.__version__}))
    raise SystemExit
layers, hidden, heads, inter = PRESETS[a.preset]
p = 0.1 if a.dropout else 0.0


def build(attn):
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=512, hidden_dropout_prob=p,
                     attention_probs_dropout_prob=p, num_labels=2, attn_implementation=attn)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    return model, opt


ids = torch.randint(1000, 21000, (a.batch, a.seq))
labels = torch.arange(a.batch) % 2


def step(model, opt):
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()
    with ctx:
        loss = model(input_ids=ids, labels=labels).loss
    forward = time.perf_counter() - start
    loss.backward()
    backward = time.perf_counter() - start - forward
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    total = time.perf_counter() - start
    return total, forward, backward, total - forward - backward


def probe(attn):
    model, opt = build(attn)
    step(model, opt)  # warm-up
    return min(step(model, opt)[0] for _ in range(2))


best = a.attn
if a.attn == "auto":
    timed = {attn: probe(attn) for attn in ("sdpa", "eager")}
    best = min(timed, key=timed.get)
model, opt = build(best)
step(model, opt)  # warm-up
times = sorted((step(model, opt) for _ in range(a.steps)), key=lambda r: r[0])
median = times[len(times) // 2]
print(json.dumps({"impl": "pytorch", "preset": a.preset, "batch": a.batch, "seq": a.seq, "precision": a.precision,
                  "threads": torch.get_num_threads(), "step_s": round(median[0], 4),
                  "tokens_per_s": round(a.batch * a.seq / median[0], 1),
                  "forward_s": round(median[1], 4), "backward_s": round(median[2], 4),
                  "optimizer_s": round(median[3], 4),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "attn": best, "torch": torch.__version__}))
