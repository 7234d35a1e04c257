#!/usr/bin/env python3
"""--deterministic: byte-identical models for any world size, batch split and thread count.

Every run trains the same global batch of 12 rows a step for 30 steps, cut as 12 rows on 1
rank, 6 on each of 2, 4 on each of 3, 3 on each of 4 (and 2 rows x 3 micro-batches on each
of 2), with OMP_NUM_THREADS 1 and 2; every model file written must equal the 1-rank,
1-thread run's byte for byte (cmp), and so must every logged training loss; and the same
with ZeRO-1 and ZeRO-2 on 2, 3 and 4 ranks; and with --deterministic-group 4 (rows in
groups of 4, one batch each) on 1 and 3 ranks, 1 and 2 threads. Two cases:
  - full training on raw text windows;
  - LoRA with dropout 0.1 on a prepared chat dataset (masked prompts, packed rows: ranks
    see different numbers of target tokens, and the dropout masks must follow the row).
A checkpoint of 2 ZeRO-2 ranks at step 15 resumed on 3 ranks and on 1 ends in the same bytes.
`deterministic: true` in a config file does what the flag does.
Then the deterministic result must be close to the default mode's on 1 rank (losses within
1e-5 relative; weights within 1e-4 of each tensor's largest value after 30 AdamW steps, as
for the default mode on N ranks against 1), so that it is not deterministic but wrong; and
the default mode must NOT be byte-identical across world sizes here (else this test could
not tell the modes apart). Last, the combinations it refuses
give one error line and exit 2.
Usage: deterministic_test.py FLOTILLA [--mpirun MPIRUN]
"""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np  # Debian's python3-numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import mpi_env, mpirun_argv, run, script_args, summary  # noqa: E402  (next to this file)
SOURCE = os.path.dirname(os.path.dirname(HERE))
GLOBAL_ROWS = 12
# (ranks, rows per micro-batch, micro-batches, ZeRO stage, thread counts): each cuts the same
# 12 rows a step.
SPLITS = [(1, 12, 1, 0, (1, 2)), (2, 6, 1, 0, (1, 2)), (3, 4, 1, 0, (1, 2)), (4, 3, 1, 0, (1, 2)),
          (2, 2, 3, 0, (1, 2)), (2, 6, 1, 1, (1,)), (3, 4, 1, 2, (2,)), (4, 3, 1, 1, (2,)), (4, 1, 3, 2, (1,))]
# --deterministic-group 4: groups of 4 rows run as one batch; the splits whose micro-batches
# are whole groups (1 and 3 ranks; 4 rows x 3 micro-batches), 1 and 2 threads.
GROUP = 4
GROUP_SPLITS = [(1, 12, 1, 0, 1), (1, 12, 1, 0, 2), (3, 4, 1, 2, 2), (1, 4, 3, 0, 1)]


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return {name: np.frombuffer(data[info["data_offsets"][0]:info["data_offsets"][1]], dtype="<f4").reshape(info["shape"])
            for name, info in header.items() if name != "__metadata__"}


def model_files(out):
    return sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "*.safetensors")))


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, filter(str.strip, f)) if "loss" in r]


def train(flotilla, mpirun, tmp, name, ranks, rows, micro, threads, args, deterministic=True):
    out = os.path.join(tmp, name)
    env = mpi_env()
    env["OMP_NUM_THREADS"] = str(threads)
    # Threads that wait by sleeping: 4 ranks x 2 spinning threads on 2 cores take 40x longer.
    env["OMP_WAIT_POLICY"] = "passive"
    launcher = mpirun_argv(mpirun, "-np", str(ranks)) if ranks > 1 else []
    run(launcher + [flotilla, "train", "--out", out, "--batch-size", str(rows), "--grad-accum", str(micro)] + args +
        (["--deterministic"] if deterministic else []), env)
    return out


def identical_everywhere(flotilla, mpirun, tmp, case, args):
    """Every split x thread count against the first run, byte for byte."""
    failures = []
    base = None
    for ranks, rows, micro, zero, thread_counts in SPLITS:
        for threads in thread_counts:
            name = f"{case}_{ranks}x{rows}x{micro}_zero{zero}_omp{threads}"
            out = train(flotilla, mpirun, tmp, name, ranks, rows, micro, threads, args + ["--zero", str(zero)])
            files = model_files(out)
            if not files:
                failures.append(f"{case}: {name} wrote no model file")
                continue
            if base is None:
                base = out
                continue
            if files != model_files(base):
                failures.append(f"{case}: {name} wrote {files}, the first run {model_files(base)}")
                continue
            before = len(failures)
            for f in files:
                with open(os.path.join(base, f), "rb") as a, open(os.path.join(out, f), "rb") as b:
                    if a.read() != b.read():
                        failures.append(f"{case}: {f} of {ranks} ranks x {rows} rows x {micro} micro-batches, "
                                        f"{threads} threads differs from 1 rank's")
            if losses(out) != losses(base):
                failures.append(f"{case}: the logged losses of {name} differ from 1 rank's")
            print(f"{case:<6} {ranks} ranks x {rows} rows x {micro} micro-batches, ZeRO-{zero}, {threads} threads: "
                  f"{'identical' if len(failures) == before else 'DIFFERENT'}")
    return failures, base


def identical_in_groups(flotilla, mpirun, tmp, case, args, rows_base):
    """--deterministic-group 4: every GROUP_SPLITS run (1 and 3 ranks, 1 and 2 threads, 3
    micro-batches) byte-identical to the first; without dropout, losses within 1e-5
    relative of the one-row-at-a-time run's (another float sum order inside a group, the
    same result)."""
    failures = []
    base = None
    for ranks, rows, micro, zero, threads in GROUP_SPLITS:
        name = f"{case}_group{GROUP}_{ranks}x{rows}x{micro}_zero{zero}_omp{threads}"
        out = train(flotilla, mpirun, tmp, name, ranks, rows, micro, threads,
                    args + ["--zero", str(zero), "--deterministic-group", str(GROUP)])
        if base is None:
            base = out
            if "--lora-dropout" in args:
                continue  # a group's dropout masks are another draw than its rows' one by one
            worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses(rows_base), losses(out)))
            if worst > 1e-5 or len(losses(out)) != len(losses(rows_base)):
                failures.append(f"{case}: groups of {GROUP} give losses {worst:.2e} relative from rows one at a time")
            continue
        same = model_files(out) == model_files(base) and all(
            open(os.path.join(base, f), "rb").read() == open(os.path.join(out, f), "rb").read() for f in model_files(base))
        if not same or losses(out) != losses(base):
            failures.append(f"{case}: {name} differs from 1 rank's with --deterministic-group {GROUP}")
        print(f"{case:<6} groups of {GROUP}: {ranks} ranks x {rows} rows x {micro} micro-batches, ZeRO-{zero}, {threads} "
              f"threads: {'identical' if same else 'DIFFERENT'}")
    return failures


def from_config_file(flotilla, mpirun, tmp, case, args, base):
    """`deterministic: true` in a config file is the flag: 2 ranks end in 1 rank's bytes."""
    cfg = os.path.join(tmp, "deterministic.yaml")
    with open(cfg, "w") as f:
        f.write("deterministic: true\n")
    out = train(flotilla, mpirun, tmp, f"{case}_config_2", 2, 6, 1, 1, args + ["-c", cfg], deterministic=False)
    same = all(open(os.path.join(base, f), "rb").read() == open(os.path.join(out, f), "rb").read()
               for f in model_files(base))
    print(f"{case:<6} 'deterministic: true' in a config file, 2 ranks: {'identical' if same else 'DIFFERENT'}")
    return [] if same else [f"{case}: 'deterministic: true' in a config file did not give 1 rank's bytes on 2"]


def resumed_on_other_worlds(flotilla, mpirun, tmp, case, args, base):
    """A checkpoint of 2 ranks at step 15, resumed on 3 ranks and on 1, ends in the
    uninterrupted run's bytes."""
    failures = []
    # Written sharded by ZeRO-2 ranks, read by plain ones.
    writer = train(flotilla, mpirun, tmp, f"{case}_ckpt_2", 2, 6, 1, 1, args + ["--save-every", "15", "--zero", "2"])
    checkpoint = os.path.join(writer, "checkpoints", "step-000015")
    if not os.path.isdir(checkpoint):
        return [f"{case}: the 2-rank run wrote no checkpoint at {checkpoint}"]
    for ranks in (3, 1):
        out = train(flotilla, mpirun, tmp, f"{case}_resumed_{ranks}", ranks, GLOBAL_ROWS // ranks, 1, 1,
                    args + ["--resume", checkpoint])
        same = all(open(os.path.join(base, f), "rb").read() == open(os.path.join(out, f), "rb").read()
                   for f in model_files(base))
        if not same or model_files(out) != model_files(base):
            failures.append(f"{case}: resumed on {ranks} ranks from 2 ranks' step 15, the model differs from the "
                            "uninterrupted run's")
        print(f"{case:<6} 2 ranks' checkpoint at step 15 resumed on {ranks}: {'identical' if same else 'DIFFERENT'}")
    return failures


def close_to_default(flotilla, mpirun, tmp, case, args):
    """1 rank, with and without the mode (LoRA without dropout: the modes key its masks
    differently)."""
    failures = []
    deterministic_out = train(flotilla, mpirun, tmp, f"{case}_deterministic_1", 1, GLOBAL_ROWS, 1, 1, args)
    default = train(flotilla, mpirun, tmp, f"{case}_default_1", 1, GLOBAL_ROWS, 1, 1, args, deterministic=False)
    worst_loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses(default), losses(deterministic_out)))
    if worst_loss > 1e-5:
        failures.append(f"{case}: deterministic losses differ from the default mode's by {worst_loss:.2e} relative")
    worst_w = 0.0
    for f in model_files(default):
        wa = read_safetensors(os.path.join(default, f))
        wb = read_safetensors(os.path.join(deterministic_out, f))
        for t in wa:
            err = float(np.abs(wa[t] - wb[t]).max()) / max(float(np.abs(wa[t]).max()), 1e-12)
            worst_w = max(worst_w, err)
    # 1e-4, as train_equivalence_test allows N ranks against 1 in the default mode: AdamW
    # turns float32 sums in another order (~1e-7 relative) into update differences of up to
    # ~lr on elements whose gradient is near 0 (the default mode differs from itself on 3
    # ranks by about as much; printed below). A wrong sum (a row lost, a wrong divisor) is
    # off by percents.
    if worst_w > 1e-4:
        failures.append(f"{case}: deterministic weights differ from the default mode's by {worst_w:.2e} relative")
    print(f"{case:<6} deterministic vs default, 1 rank: max loss rel err {worst_loss:.2e}, max weight rel err {worst_w:.2e}")
    # Without the mode, 3 ranks do not reproduce 1 rank's bytes: what the mode is for.
    other = train(flotilla, mpirun, tmp, f"{case}_default_3", 3, GLOBAL_ROWS // 3, 1, 1, args, deterministic=False)
    same = all(open(os.path.join(default, f), "rb").read() == open(os.path.join(other, f), "rb").read()
               for f in model_files(default))
    spread = 0.0
    for f in model_files(default):
        wa = read_safetensors(os.path.join(default, f))
        wb = read_safetensors(os.path.join(other, f))
        for t in wa:
            spread = max(spread, float(np.abs(wa[t] - wb[t]).max()) / max(float(np.abs(wa[t]).max()), 1e-12))
    print(f"{case:<6} default mode, 1 vs 3 ranks: max weight rel err {spread:.2e}")
    if same:
        failures.append(f"{case}: the default mode gave the same bytes on 1 and 3 ranks: the test cannot tell the modes "
                        "apart (change the data or the steps)")
    return failures


def refusals(flotilla, mpirun, tmp, model, data):
    failures = []
    cases = [(["--zero", "3"], "--zero 3"), (["--sync-every", "4"], "--sync-every"), (["--compression", "fp16"], "--compression"),
             (["--parallel", "dp=1,pp=2,tp=1"], "pipeline"),
             (["--batch-size", "6", "--deterministic-group", "4"], "--deterministic-group")]
    for extra, word in cases:
        launcher = mpirun_argv(mpirun, "-np", "2") if "--parallel" in extra else []
        cmd = launcher + [flotilla, "train", "--model", model, "--out", os.path.join(tmp, "refused"), "--steps", "1", "--warmup", "0",
               "--deterministic"] + data + extra
        proc = subprocess.run(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        # Under mpirun every rank says it (the same line), and mpirun adds its abort banner.
        lines = sorted(set(ln for ln in proc.stderr.splitlines() if ln.startswith("flotilla: error:")))
        alone = launcher or len(proc.stderr.strip().splitlines()) == 1
        if proc.returncode != 2 or len(lines) != 1 or not alone or word not in lines[0]:
            failures.append(f"--deterministic {' '.join(extra)}: exit {proc.returncode}, stderr {proc.stderr!r}")
        else:
            print(f"refused: --deterministic {' '.join(extra)}: {lines[0]}")
    return failures


def main():
    args = script_args()
    env = mpi_env()
    tmp = tempfile.mkdtemp(prefix="flotilla_det_")
    failures = []
    try:
        model = os.path.join(tmp, "model")
        run([args.flotilla, "init", "--preset", "tiny", "--out", model, "--seed", "5"], env)
        prepared = os.path.join(tmp, "prepared")
        run([args.flotilla, "data", "prepare", "--model", model, "--data", os.path.join(SOURCE, "data/pirate/chat"),
             "--out", prepared, "--chat-template", "chatml", "--mask-prompt", "--max-seq-len", "96"], env)
        common = ["--model", model, "--steps", "30", "--lr", "3e-3", "--warmup", "3", "--seed", "11",
                  "--log-every", "1", "--eval-every", "0", "--eval-batches", "1"]
        cases = {
            "full": common + ["--seq-len", "32", "--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")],
            "lora": common + ["--seq-len", "96", "--data", prepared, "--fine-tune-type", "lora", "--lora-dropout", "0.1", "--lora-targets",
                              "q,v,down"],
        }
        for case, case_args in cases.items():
            found, base = identical_everywhere(args.flotilla, args.mpirun, tmp, case, case_args)
            failures += found
            if base:
                failures += identical_in_groups(args.flotilla, args.mpirun, tmp, case, case_args, base)
                failures += resumed_on_other_worlds(args.flotilla, args.mpirun, tmp, case, case_args, base)
                if case == "full":
                    failures += from_config_file(args.flotilla, args.mpirun, tmp, case, case_args, base)
            without_dropout = [a if a != "0.1" else "0" for a in case_args]
            failures += close_to_default(args.flotilla, args.mpirun, tmp, case, without_dropout)
        failures += refusals(args.flotilla, args.mpirun, tmp, model, ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures)


if __name__ == "__main__":
    sys.exit(main())
