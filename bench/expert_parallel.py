#!/usr/bin/env python3
"""Expert parallelism measured: configs/mixtral-tiny.json (8 experts, top 2) trained in
full, LoRA-tuned on the attention (mode lora: q,k,v,o) and LoRA-tuned on the attention and
every expert (mode lora-x: q,k,v,o,w1,w2,w3) on 1, 2 and 4 ranks with --parallel ep=N,
the same global batch. Prints a table: median tokens/s over the steps after the first two,
rank 0's bytes sent per step (expert row exchanges; gradient all-reduce), and every rank's
peak resident memory (GNU time's maximum RSS).
Usage: bench/expert_parallel.py FLOTILLA [--steps N] [--batch G] [--seq T] [--config CONFIG.json]
                                [--modes full,lora,lora-x] [--ranks 1,2,4]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flotilla")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--config", default=os.path.join(SOURCE, "configs/mixtral-tiny.json"))
    ap.add_argument("--modes", default="full,lora,lora-x")
    ap.add_argument("--ranks", default="1,2,4")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_MCA_btl_vader_single_copy_mechanism="none",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    tmp = tempfile.mkdtemp(prefix="flotilla_ep_bench_")
    try:
        model = os.path.join(tmp, "model")
        subprocess.run([args.flotilla, "init", "--config", args.config,
                        "--out", model, "--seed", "5"], env=env, check=True, capture_output=True)
        print(f"{'mode':<6} {'ranks':>5} {'tokens/s':>9} {'expert B/step':>14} {'grad B/step':>12}  peak RSS per rank (MiB)")
        targets = {"lora": "q,k,v,o", "lora-x": "q,k,v,o,w1,w2,w3"}
        for mode in args.modes.split(","):
            for ranks in (int(r) for r in args.ranks.split(",")):
                out = os.path.join(tmp, f"{mode}_{ranks}")
                cmd = ["/usr/bin/time", "-f", "maxrss_kib %M", args.flotilla, "train", "--model", model, "--out", out,
                       "--data", os.path.join(SOURCE, "data/sample/corpus.jsonl"), "--steps", str(args.steps),
                       "--seq-len", str(args.seq), "--batch-size", str(args.batch // ranks), "--log-every", "1",
                       "--eval-every", "0", "--warmup", "2", "--seed", "11"]
                if mode in targets:
                    cmd += ["--fine-tune-type", "lora", "--lora-targets", targets[mode]]
                if ranks > 1:
                    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader,tcp", "-np",
                           str(ranks)] + cmd + ["--parallel", f"ep={ranks}"]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-2000:])
                    return 1
                rss = [int(m) / 1024 for m in re.findall(r"maxrss_kib (\d+)", proc.stderr)]
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
                tps = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2)
                with open(os.path.join(out, "report.json")) as f:
                    report = json.load(f)
                expert_b = report.get("expert_parallel", {}).get("expert_bytes_per_step", 0)
                grad_b = report.get("gradient_bytes_per_step", 0)
                print(f"{mode:<6} {ranks:>5} {tps:>9.0f} {expert_b:>14.0f} {grad_b:>12.0f}  "
                      + " ".join(f"{r:.0f}" for r in sorted(rss)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
