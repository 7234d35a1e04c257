#!/usr/bin/env python3
"""Tokens/s of `flotilla train --deterministic` against the default mode, on 1 rank (2
threads) and 2 ranks (1 thread each), on the W1 shape (dim 288, 6 layers, 6 heads, FFN 768,
vocab 32000, untied; seq 256, global batch 8 rows). The modes alternate, run after run, so
that a change in the machine's load falls on both; the median step after the first of each
run is taken; --group G is the deterministic mode's --deterministic-group (default 4: the
8 rows are 2 groups on 1 rank, 1 on each of 2); the table gives the best of the repeats and the median ratio of each
deterministic run to the default run just before it.

Usage: bench/deterministic_cost.py FLOTILLA [--steps 6] [--repeats 2] [--group 4] [--mpirun mpirun]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W1 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 288, "num_hidden_layers": 6,
      "num_attention_heads": 6, "num_key_value_heads": 6, "intermediate_size": 768, "vocab_size": 32000,
      "tie_word_embeddings": False, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
      "hidden_act": "silu"}


def tokens_per_s(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if "tokens_per_s" in r and r.get("step", 0) > 1]
    return statistics.median(r["tokens_per_s"] for r in steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flotilla")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--mpirun", default="mpirun")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="flotilla_det_bench_")
    try:
        with open(os.path.join(tmp, "w1.json"), "w") as f:
            json.dump(W1, f)
        model = os.path.join(tmp, "w1")
        subprocess.run([args.flotilla, "init", "--config", os.path.join(tmp, "w1.json"), "--out", model, "--seed", "1"],
                       check=True, stdout=subprocess.DEVNULL)
        common = ["--model", model, "--data", os.path.join(SOURCE, "data/sample/corpus.jsonl"), "--steps",
                  str(args.steps), "--seq-len", "256", "--warmup", "1", "--log-every", "1", "--eval-every", "0",
                  "--eval-batches", "1", "--seed", "3"]
        best = {}
        pair_ratios = {1: [], 2: []}
        for ranks in (1, 2):
            env = dict(os.environ, OMP_NUM_THREADS=str(2 // ranks), OMPI_MCA_btl_vader_single_copy_mechanism="none",
                       OMP_WAIT_POLICY="passive")
            launcher = [args.mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(ranks)] if ranks > 1 else []
            for repeat in range(args.repeats):
                for mode in ("default", "deterministic"):
                    out = os.path.join(tmp, f"{mode}_{ranks}_{repeat}")
                    load = os.getloadavg()[0]
                    subprocess.run(launcher + [args.flotilla, "train", "--out", out, "--batch-size", str(8 // ranks)] +
                                   common + (["--deterministic", "--deterministic-group", str(args.group)]
                                            if mode == "deterministic" else []),
                                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    tps = tokens_per_s(out)
                    print(f"  {ranks} rank(s), {mode:<13} repeat {repeat}: {tps:8.0f} tokens/s (load before {load:.1f})",
                          flush=True)
                    best[(ranks, mode)] = max(best.get((ranks, mode), 0.0), tps)
                    if mode == "deterministic":
                        pair_ratios[ranks].append(tps / last_default)
                    else:
                        last_default = tps
        print("| ranks x threads | default tokens/s (best) | deterministic tokens/s (best) | ratio of bests | "
              "median ratio of back-to-back pairs |")
        print("|---|---|---|---|---|")
        for ranks in (1, 2):
            d, x = best[(ranks, "default")], best[(ranks, "deterministic")]
            print(f"| {ranks} x {2 // ranks} | {d:.0f} | {x:.0f} | {x / d:.2f} | "
                  f"{statistics.median(pair_ratios[ranks]):.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
