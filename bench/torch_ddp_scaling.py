#!/usr/bin/python3
"""PyTorch DistributedDataParallel peer for flotilla's data-parallel scaling benchmark.

    /usr/bin/python3 bench/torch_ddp_scaling.py --workload W1 --ranks 2 --threads 1 --steps 5 --warmup 1

Starts --ranks processes (torch.multiprocessing, gloo backend over a file store), each
with --threads threads, wraps the workload's Llama (bench/torch_train_throughput.py's
model) in DistributedDataParallel with its defaults (25 MB buckets, all-reduce overlapped
with backward) and times full AdamW steps on random tokens, every rank its own batch of
the workload's shape — weak scaling, as bench/scaling.cpp measures flotilla. The time is
rank 0's between two barriers around the timed steps. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train_throughput import WORKLOADS, make_model  # noqa: E402


def worker(rank: int, args: argparse.Namespace, store_path: str, results) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=args.ranks)
    torch.manual_seed(args.seed)  # DDP broadcasts rank 0's weights anyway
    w = WORKLOADS[args.workload]
    B, T, V = w["batch_size"], w["seq_len"], w["vocab_size"]
    model = DistributedDataParallel(make_model(w)) if args.ranks > 1 else make_model(w)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed + 1000 + rank)

    def train_step() -> None:
        seq = torch.randint(0, V, (B, T + 1), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        train_step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    dist.barrier()
    elapsed_s = time.perf_counter() - start
    if rank == 0:
        results.put({
            "impl": "pytorch-ddp",
            "torch": torch.__version__,
            "workload": args.workload,
            "ranks": args.ranks,
            "threads": args.threads,
            "batch_per_rank": B,
            "seq": T,
            "steps": args.steps,
            "tokens_per_s": args.ranks * B * T * args.steps / elapsed_s,
            "step_ms": 1000.0 * elapsed_s / args.steps,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description="PyTorch DDP scaling peer")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.ranks < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --ranks >= 1, --steps >= 1, --warmup >= 0, --threads >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="flotilla_ddp_") as tmp:
        mp.start_processes(worker, args=(args, os.path.join(tmp, "store"), results), nprocs=args.ranks,
                           start_method="spawn")
        print(json.dumps(results.get()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
