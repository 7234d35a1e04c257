#!/usr/bin/env python3
"""Fewer bytes on the sample runs, 2 ranks: gradient compression and local SGD.

Each strategy trains under mpirun -np 2 and is compared with the uncompressed run of the
same seed (final validation loss, and gradient bytes per step as the ring convention counts
them). Two runs:

1. Full training of the tiny preset on data/sample/corpus.jsonl, 200 steps:
   - fp16, bf16: half the bytes (exactly) and the loss within 2% (measured: within 0.01%);
   - topk: density 0.5, values in int8 (a bitmap per 2^16 block, a byte a value, a float
     scale per 64 values): at least 4x fewer bytes (6.1x) and within 2% (seeds 1-5: +0.2 to
     +1.1%);
   - powersgd: rank 24, factors in int8: at least 4x fewer (7.1x), within 2% (seeds 1-5:
     -0.9 to +1.1%); and rank 12 in bf16 after 40 dense bf16 steps (4.8x, +0.4 to +0.5%);
   - local SGD, weights averaged every 4 steps: at most 1/4 of the bytes, within 10% (+3%).
2. The sample fine-tuning: the demo's step 3 (LoRA rank 16 on every projection, the pirate
   chat set as ChatML with the prompts masked, 300 steps) over a base made here the demo's
   way but shorter (300 pretraining steps of configs/demo-model.json, no instruction step):
   - topk density 0.5 int8 (6.1x) and powersgd rank 12 int8 (4.6x): at least 4x fewer bytes,
     within 2% — the issue's target. Measured on this base, seeds 1-3: top-k +0.8 to +1.0%,
     PowerSGD +0.4 to +0.6%; on the demo's own base (1500 + 400 steps), seeds 1-5: top-k
     +0.1 to +0.5%, PowerSGD +0.2 to +0.6% (bench/RESULTS.md).
Usage: compression_convergence_test.py FLOTILLA [--mpirun MPIRUN] [--only tiny|lora]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import mpi_env, run, summary  # noqa: E402  (next to this file)
SOURCE = os.path.dirname(os.path.dirname(HERE))

TOPK_INT8 = ["--compression", "topk", "--topk-density", "0.5", "--compression-dtype", "int8"]
TINY_CASES = {  # name: (flags, most bytes relative to uncompressed, largest relative loss gap)
    "fp16": (["--compression", "fp16"], 0.5 + 1e-3, 0.02),
    "bf16": (["--compression", "bf16"], 0.5 + 1e-3, 0.02),
    "topk-int8": (TOPK_INT8, 0.25, 0.02),
    "powersgd-int8": (["--compression", "powersgd", "--powersgd-rank", "24", "--compression-dtype", "int8"], 0.25, 0.02),
    "powersgd-bf16": (["--compression", "powersgd", "--powersgd-rank", "12", "--compression-dtype", "bf16",
                       "--compression-warmup", "40"], 0.25, 0.02),
    "local-sgd": (["--sync-every", "4"], 0.25 + 1e-3, 0.10),
}
LORA_CASES = {
    "topk-int8": (TOPK_INT8, 0.25, 0.02),
    "powersgd-int8": (["--compression", "powersgd", "--powersgd-rank", "12", "--compression-dtype", "int8"], 0.25, 0.02),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flotilla")
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--only", choices=["tiny", "lora"])
    args = ap.parse_args()
    env = mpi_env(FLOTILLA_PROGRESS="lines")
    mpirun = [args.mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--mca", "btl",
              "self,vader,tcp", "-np", "2"]
    tmp = tempfile.mkdtemp(prefix="flotilla_compress_")
    failures = []

    def compare(title, common, cases):
        """Trains `common` plain and with each case's flags; records what misses its bounds."""
        def train(name, flags):
            out = os.path.join(tmp, title + "-" + name)
            run(mpirun + [args.flotilla, "train", "--threads", "1"] + common + ["--out", out] + flags, env)
            with open(os.path.join(out, "report.json")) as f:
                r = json.load(f)
            return r["final_valid_loss"], r["gradient_bytes_per_step"]

        base_loss, base_bytes = train("none", [])
        print(f"{title}: {'none':<14} validation {base_loss:.4f}, {base_bytes / 1024:.1f} KiB/step", flush=True)
        for name, (flags, max_bytes, max_gap) in cases.items():
            loss, sent = train(name, flags)
            gap, ratio = (loss - base_loss) / base_loss, sent / base_bytes
            print(f"{title}: {name:<14} validation {loss:.4f} ({100 * gap:+.2f}%), {sent / 1024:.1f} KiB/step "
                  f"({1 / ratio:.1f}x fewer bytes)", flush=True)
            if ratio > max_bytes:
                failures.append(f"{title} {name}: sent {ratio:.3f} of the uncompressed bytes (at most {max_bytes:.3f})")
            if gap > max_gap:
                failures.append(f"{title} {name}: validation loss {loss:.4f} is {100 * gap:.1f}% above "
                                f"{base_loss:.4f} (at most {100 * max_gap:.0f}%)")

    try:
        if args.only in (None, "tiny"):
            model = os.path.join(tmp, "tiny")
            run([args.flotilla, "init", "--preset", "tiny", "--out", model, "--seed", "1"], env)
            compare("tiny", ["--model", model, "--data", os.path.join(SOURCE, "data/sample/corpus.jsonl"),
                             "--steps", "200", "--batch-size", "4", "--seq-len", "128", "--lr", "3e-3", "--warmup",
                             "10", "--eval-every", "0", "--eval-batches", "8", "--log-every", "1000", "--seed", "3"],
                    TINY_CASES)
        if args.only in (None, "lora"):
            # The demo's base, shorter: pretraining only (scripts/demo's flags, 300 steps).
            base = os.path.join(tmp, "base")
            run(mpirun + [args.flotilla, "train", "--threads", "1", "--config",
                          os.path.join(SOURCE, "configs/demo-model.json"), "--data",
                          os.path.join(SOURCE, "data/sample/corpus.txt"), "--steps", "300", "--batch-size", "4",
                          "--seq-len", "128", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup", "50", "--eval-every",
                          "0", "--log-every", "1000", "--seed", "1", "--out", base], env)
            data = os.path.join(tmp, "pirate")
            run([args.flotilla, "data", "prepare", "--model", base, "--data", os.path.join(SOURCE, "data/pirate/chat"),
                 "--out", data, "--chat-template", "chatml", "--mask-prompt", "--max-seq-len", "256"], env)
            # scripts/demo's step 3.
            compare("lora", ["--model", base, "--data", data, "--fine-tune-type", "lora", "--lora-rank", "16",
                             "--lora-alpha", "32", "--lora-targets", "q,k,v,o,gate,up,down", "--steps", "300",
                             "--batch-size", "4", "--seq-len", "256", "--lr", "2e-3", "--warmup", "20",
                             "--eval-every", "100", "--log-every", "1000", "--seed", "1"],
                    LORA_CASES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures)


if __name__ == "__main__":
    sys.exit(main())
