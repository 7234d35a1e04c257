#!/usr/bin/env python3
"""Step time of `flotilla train --balance` against equal shares when one rank is slower.

N ranks (default 2, 1 thread each) train the 15M preset on raw text (seq 64, a global
batch of 4 rows per rank); one rank is made FACTOR times as slow (default 2) with the test
hook FLOTILLA_TEST_SLOW_RANK (it sleeps FACTOR - 1 times its forward and backward after
each micro-batch: a slower machine that never competes for the others' cores). The two
runs alternate, run after run, so that a change in the machine's load falls on both; the
median step time over the steps after the second re-cut is taken (the balancer re-cuts
every --every steps). Printed: a table of step times, their ratio, and the rows each rank
ran at the end against the ideal cut (speeds 1 : 1/FACTOR).

With --launcher a prefix replaces the plain mpirun (e.g. netcluster's
`../shared/netcluster/netcluster.sh mpirun` for emulated hosts; the hook's variable is
passed with -x).

Usage: bench/balance_step_time.py FLOTILLA [--ranks 2] [--factor 2] [--rows 4] [--seq-len 64]
                                  [--steps 15] [--every 3] [--repeats 2] [--mpirun mpirun]
                                  [--launcher '...'] [--out-dir DIR]
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "step_s" in r]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flotilla")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--slow-rank", type=int, default=1)
    ap.add_argument("--rows", type=int, default=4, help="rows per rank without balancing")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--launcher", default="", help="replaces '<mpirun> --allow-run-as-root --oversubscribe'")
    ap.add_argument("--out-dir", default="", help="keep the runs here (default: a temporary folder, removed)")
    args = ap.parse_args()
    tmp = args.out_dir or tempfile.mkdtemp(prefix="flotilla_balance_bench_")
    os.makedirs(tmp, exist_ok=True)
    slow = f"{args.slow_rank}:{args.factor}"
    try:
        model = os.path.join(tmp, "model")
        if not os.path.isdir(model):
            subprocess.run([args.flotilla, "init", "--preset", "15M", "--out", model, "--seed", "1"], check=True,
                           stdout=subprocess.DEVNULL)
        env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_MCA_btl_vader_single_copy_mechanism="none",
                   OMP_WAIT_POLICY="passive", FLOTILLA_TEST_SLOW_RANK=slow)
        if args.launcher:
            launcher = shlex.split(args.launcher) + ["-x", "FLOTILLA_TEST_SLOW_RANK", "-x", "OMP_NUM_THREADS",
                                                     "-np", str(args.ranks)]
        else:
            launcher = [args.mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(args.ranks)]
        common = ["--model", model, "--data", os.path.join(SOURCE, "data/sample/corpus.jsonl"), "--steps",
                  str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.rows), "--warmup", "1",
                  "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--seed", "3"]
        times = {"equal shares": [], "--balance": []}
        last_rows = None
        for repeat in range(args.repeats):
            for mode in times:
                out = os.path.join(tmp, f"{'balance' if mode == '--balance' else 'equal'}_{repeat}")
                shutil.rmtree(out, ignore_errors=True)
                load = os.getloadavg()[0]
                extra = ["--balance", "--balance-every", str(args.every)] if mode == "--balance" else []
                subprocess.run(launcher + [args.flotilla, "train", "--out", out] + common + extra, env=env,
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                lines = steps(out)
                measured = [r["step_s"] for r in lines if r["step"] > 2 * args.every]
                t = statistics.median(measured)
                times[mode].append(t)
                if mode == "--balance":
                    last_rows = lines[-1].get("rank_rows")
                print(f"repeat {repeat} {mode:<13} median step {t:.3f} s over steps {2 * args.every + 1}-"
                      f"{args.steps} (load {load:.1f})" +
                      (f", rows per rank at the end {last_rows}" if mode == "--balance" else ""), flush=True)
        G = args.rows * args.ranks
        weights = [1.0 / args.factor if r == args.slow_rank else 1.0 for r in range(args.ranks)]
        ideal = [round(G * w / sum(weights), 1) for w in weights]
        eq, bal = min(times["equal shares"]), min(times["--balance"])
        pairs = [b / e for e, b in zip(times["equal shares"], times["--balance"])]
        print()
        print(f"| ranks | slow rank x{args.factor:g} | equal shares step s (best) | --balance step s (best) | "
              f"ratio of bests | ratios of back-to-back pairs | rows at the end (ideal) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {args.ranks} | rank {args.slow_rank} | {eq:.3f} | {bal:.3f} | {bal / eq:.2f} | "
              f"{', '.join(f'{p:.2f}' for p in pairs)} | {last_rows} ({ideal}) |")
    finally:
        if not args.out_dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
