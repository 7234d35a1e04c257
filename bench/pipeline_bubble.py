#!/usr/bin/env python3
"""Pipeline parallelism measured from `flotilla train --trace` (issue 15, item 2).

For each (P, M, schedule): one `mpirun -np P flotilla train --parallel pp=P
--micro-batches M` run with a trace per rank; from each rank's "pipeline flush" spans (all
steps but the first), the stage's idle fraction

    idle = 1 - (time in its forward and backward spans) / (time in its flushes)

against the bubble of equal stages (P-1)/(M+P-1); the most activation slots (micro-batches
held at once) the stage reported; the bytes it sent to its neighbours per step; and the
run's median tokens/s (metrics.jsonl). With --dp, a `--parallel dp=P` run of the same
global batch for the tokens/s comparison.

Usage: pipeline_bubble.py FLOTILLA --model DIR --data FILE [--P 2,4] [--M 1,2,4,8]
         [--schedules 1f1b,gpipe] [--batch-size 8] [--seq-len 64] [--steps 6] [--dp]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def flush_stats(trace_file):
    with open(trace_file) as f:
        data = json.load(f)
    events = [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]
    flushes = sorted((e for e in events if e["name"] == "pipeline flush"), key=lambda e: e["ts"])[1:]  # step 1: warm-up
    busy = total = 0.0
    for fl in flushes:
        total += fl["dur"]
        lo, hi = fl["ts"], fl["ts"] + fl["dur"]
        busy += sum(e["dur"] for e in events
                    if e["name"] in ("forward", "backward") and e.get("tid") == fl.get("tid") and lo <= e["ts"] < hi)
    last = flushes[-1]["args"] if flushes else {}
    return {"idle": 1.0 - busy / total if total else float("nan"), "slots": last.get("slots"),
            "p2p_bytes": last.get("p2p_bytes"), "stage": last.get("stage")}


def tokens_per_s(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return statistics.median(rates) if rates else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flotilla")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--P", default="2,4")
    ap.add_argument("--M", default="1,2,4,8")
    ap.add_argument("--schedules", default="1f1b,gpipe")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dp", action="store_true", help="also run dp=P on the same global batch")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_MCA_btl_vader_single_copy_mechanism="none",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = [args.mpirun, "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader,tcp"]
    tmp = tempfile.mkdtemp(prefix="flotilla_bubble_")
    common = ["--model", args.model, "--data", args.data, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
              "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--warmup", "1"]
    print(f"{'P':>2} {'M':>3} {'schedule':<8} {'stage':>5} {'idle':>6} {'(P-1)/(M+P-1)':>13} {'slots':>5} "
          f"{'p2p MiB/step':>12} {'tokens/s':>9}")
    for P in map(int, args.P.split(",")):
        if args.dp:
            out = os.path.join(tmp, f"dp{P}")
            subprocess.run(mpirun + ["-np", str(P), args.flotilla, "train", "--out", out, "--parallel", f"dp={P}",
                                     "--batch-size", str(args.batch_size // P)] + common,
                           env=env, check=True, stdout=subprocess.DEVNULL)
            print(f"{P:>2} {'-':>3} {'dp=' + str(P):<8} {'-':>5} {'-':>6} {'-':>13} {'-':>5} {'-':>12} "
                  f"{tokens_per_s(out):>9.0f}")
        for M in map(int, args.M.split(",")):
            for schedule in args.schedules.split(","):
                out = os.path.join(tmp, f"pp{P}_m{M}_{schedule}")
                trace = os.path.join(tmp, f"pp{P}_m{M}_{schedule}.json")
                subprocess.run(mpirun + ["-np", str(P), args.flotilla, "train", "--out", out, "--parallel", f"pp={P}",
                                         "--micro-batches", str(M), "--pp-schedule", schedule, "--trace", trace,
                                         "--batch-size", str(args.batch_size)] + common,
                               env=env, check=True, stdout=subprocess.DEVNULL)
                rate = tokens_per_s(out)
                for rank in range(P):
                    f = trace if rank == 0 else trace.replace(".json", f".rank{rank}.json")
                    s = flush_stats(f)
                    print(f"{P:>2} {M:>3} {schedule:<8} {rank:>5} {s['idle']:>6.2f} {(P - 1) / (M + P - 1):>13.2f} "
                          f"{s['slots']:>5} {s['p2p_bytes'] / 2**20:>12.2f} {rate if rank == 0 else float('nan'):>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
