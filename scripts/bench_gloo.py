"""PyTorch's CPU all-reduce (gloo) between WORLD processes on loopback, the peer of our TCP ring in
`worker bench-ring` in scripts/bench.py: the same sizes, the same iteration count, the same median and the same bus
bandwidth formula 2(N-1)/N x bytes / time. Prints one JSON line per size (rank 0).

    python scripts/bench_gloo.py --world 2 --sizes-mib 1,16,64,256 --iters 5
"""

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, world, port, sizes, iters):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mib in sizes:
        n = mib * (1 << 20) // 4
        buf = (torch.arange(n, dtype=torch.float32) % 97) + rank
        dist.all_reduce(buf)  # warm-up
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        if rank == 0:
            bus = 2 * (world - 1) / world * n * 4 / t / 1e9
            print(json.dumps({"impl": "gloo", "world": world, "mib": mib, "seconds": round(t, 4),
                              "bus_gb_per_s": round(bus, 3)}), flush=True)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes-mib", default="1,16,64,256")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    sizes = [int(x) for x in a.sizes_mib.split(",")]
    mp.spawn(run, args=(a.world, port, sizes, a.iters), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
