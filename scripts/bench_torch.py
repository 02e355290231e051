#!/usr/bin/env python3
"""The PyTorch peer of `worker bench`: forward+backward of transformers' BertForSequenceClassification
on random tokens, same shapes, fp32, same thread count. Prints one JSON line like `worker bench`.

    python scripts/bench_torch.py --preset minilm --batch 32 --seq 128 --steps 5 [--dropout]
"""
import argparse
import json
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
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
layers, hidden, heads, inter = PRESETS[a.preset]
p = 0.1 if a.dropout else 0.0
cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=inter, max_position_embeddings=512, hidden_dropout_prob=p,
                 attention_probs_dropout_prob=p, num_labels=2)
torch.manual_seed(0)
model = BertForSequenceClassification(cfg).train()
ids = torch.randint(1000, 21000, (a.batch, a.seq))
labels = torch.arange(a.batch) % 2
times = []
for s in range(a.steps + 1):
    start = time.perf_counter()
    model.zero_grad(set_to_none=False)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    if s > 0:
        times.append(time.perf_counter() - start)
times.sort()
median = times[len(times) // 2]
print(json.dumps({"impl": "pytorch", "preset": a.preset, "batch": a.batch, "seq": a.seq,
                  "threads": torch.get_num_threads(), "step_s": round(median, 4),
                  "tokens_per_s": round(a.batch * a.seq / median, 1),
                  "attn": model.config._attn_implementation, "torch": torch.__version__}))
