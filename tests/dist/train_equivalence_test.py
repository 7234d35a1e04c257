#!/usr/bin/env python3
"""Data parallel on N ranks = one rank with the same global batch.

Runs `flotilla train` alone with micro-batch G, then under mpirun on 2 and 4 ranks with
micro-batch G/N (the same global batch), and checks every step's loss (relative 1e-5) and
every final weight (relative 1e-4 of the tensor's largest value). Two data paths:
  - raw text windows (each rank keeps its slice of the same draw);
  - a prepared chat dataset with --mask-prompt, packed rows, so ranks see different
    numbers of target tokens: only token-weighted gradient averaging passes this.
Then a checkpoint written mid-run by 2 ranks is resumed on 1 and on 4 ranks (micro-batch
changed so the global batch stays the same): the resumed steps' losses and the final
weights must match the uninterrupted 1-rank run to the same tolerances. And 2 ranks with
--grad-checkpoint (blocks recomputed in backward while buckets are reduced) match it too.

With --tcp: 2 ranks over TCP only (`--mca btl tcp,self`, no shared memory), once per
gradient all-reduce algorithm (`--allreduce auto|ring|hd|hier|mpi`), each against the same
1-rank run on raw text windows.
Usage: train_equivalence_test.py FLOTILLA [--mpirun MPIRUN] [--tcp]
"""
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np  # Debian's python3-numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import mpi_env, mpirun_argv, run, script_args, summary  # noqa: E402  (next to this file)
SOURCE = os.path.dirname(os.path.dirname(HERE))


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype="<f4").reshape(info["shape"])
    return out


def losses(run_dir, from_step=0):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["step"] > from_step]
    return [r["loss"] for r in rows if "loss" in r], [r["valid_loss"] for r in rows if "valid_loss" in r]


def compare(name, base_dir, other_dir, ranks, from_step=0):
    """Every loss of other_dir's run (steps after from_step, for a resumed run) and its final
    weights against base_dir's."""
    failures = []
    base_train, base_valid = losses(base_dir, from_step)
    other_train, other_valid = losses(other_dir, from_step)
    if len(base_train) != len(other_train):
        failures.append(f"{name}: {len(base_train)} vs {len(other_train)} steps")
    worst_loss = 0.0
    for step, (a, b) in enumerate(zip(base_train + base_valid, other_train + other_valid)):
        err = abs(a - b) / max(abs(a), 1e-12)
        worst_loss = max(worst_loss, err)
        if err > 1e-5:
            failures.append(f"{name}: step {step + 1} loss {a!r} (1 rank) vs {b!r} ({ranks} ranks), rel {err:.2e}")
    wa = read_safetensors(os.path.join(base_dir, "model.safetensors"))
    wb = read_safetensors(os.path.join(other_dir, "model.safetensors"))
    worst_w = 0.0
    for t in wa:
        scale = max(float(np.abs(wa[t]).max()), 1e-12)
        err = float(np.abs(wa[t] - wb[t]).max()) / scale
        worst_w = max(worst_w, err)
        if err > 1e-4:
            failures.append(f"{name}: weight {t} differs by {err:.2e} relative on {ranks} ranks")
    print(f"{name:<28} {ranks} ranks: max loss rel err {worst_loss:.2e}, max weight rel err {worst_w:.2e}")
    return failures


def overlapped_buckets(flotilla, mpirun, env, tmp, model, base, data, common, global_batch):
    """Small fusion buckets reduced during backward give the same run, and the trace holds
    every bucket's all-reduce. (How many start while backward still runs depends on the
    machine's load; comm/fusion's unit test checks that a bucket starts before finish.)"""
    out = os.path.join(tmp, "overlap_2")
    trace = os.path.join(tmp, "trace.json")
    run(mpirun + ["-np", "2", flotilla, "train", "--model", model, "--out", out, "--bucket-mb", "0.02",
                  "--trace", trace, "--batch-size", str(global_batch // 2)] + data + common, env)
    failures = compare("overlapped 20 KiB buckets", base, out, 2)
    with open(trace) as f:
        events = [e for e in json.load(f) if e.get("ph") == "X"]
    backward = [e for e in events if e["name"] == "backward"]
    buckets = [e for e in events if e["name"].startswith("all-reduce bucket")]
    with open(os.path.join(out, "report.json")) as f:
        per_step = json.load(f)["fusion_buckets"]
    early = sum(1 for c in buckets if any(b["ts"] <= c["ts"] < b["ts"] + b["dur"] for b in backward))
    print(f"{'overlapped 20 KiB buckets':<28} {per_step} buckets a step, {len(buckets)} reduced, "
          f"{early} of them started during backward")
    if per_step < 2 or len(buckets) < per_step:
        failures.append(f"expected several buckets a step, got {per_step} ({len(buckets)} in the trace)")
    return failures


def resume_on_other_world_sizes(flotilla, mpirun, env, tmp, model, base, data, common, global_batch):
    """A checkpoint of a 2-rank run at step 3 of 6, continued on 1 and on 4 ranks, ends where
    the uninterrupted 1-rank run ends."""
    failures = []
    writer = os.path.join(tmp, "ckpt_2ranks")
    run(mpirun + ["-np", "2", flotilla, "train", "--model", model, "--out", writer, "--save-every", "3",
                  "--batch-size", str(global_batch // 2)] + data + common, env)
    checkpoint = os.path.join(writer, "checkpoints", "step-000003")
    if not os.path.isdir(checkpoint):
        return [f"the 2-rank run wrote no checkpoint at {checkpoint}"]
    for ranks in (1, 4):
        out = os.path.join(tmp, f"resumed_on_{ranks}")
        launcher = mpirun + ["-np", str(ranks)] if ranks > 1 else []
        log = run(launcher + [flotilla, "train", "--model", model, "--out", out, "--resume", checkpoint,
                              "--batch-size", str(global_batch // ranks)] + data + common, env)
        if "resumed from" not in log:
            failures.append(f"the run on {ranks} ranks did not say it resumed:\n{log}")
        failures += compare("2-rank checkpoint resumed", base, out, ranks, from_step=3)
    return failures


def grad_checkpoint_on_two_ranks(flotilla, mpirun, env, tmp, model, base, data, common, global_batch):
    """2 ranks recomputing every block in backward (--grad-checkpoint), buckets reduced as
    layers finish, end where the 1-rank run without it ends."""
    out = os.path.join(tmp, "grad_checkpoint_2")
    log = run(mpirun + ["-np", "2", flotilla, "train", "--model", model, "--out", out, "--grad-checkpoint",
                        "--batch-size", str(global_batch // 2)] + data + common, env)
    failures = [] if "gradient checkpointing" in log else [f"the run did not say it checkpoints:\n{log}"]
    return failures + compare("2 ranks, --grad-checkpoint", base, out, 2)


def main():
    args = script_args((("--tcp",), {"action": "store_true", "help": "2 ranks over TCP only, every --allreduce"}))
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun)
    tmp = tempfile.mkdtemp(prefix="flotilla_dp_")
    failures = []
    try:
        model = os.path.join(tmp, "model")
        run([args.flotilla, "init", "--preset", "tiny", "--out", model, "--seed", "5"], env)
        prepared = os.path.join(tmp, "prepared")
        run([args.flotilla, "data", "prepare", "--model", model, "--data", os.path.join(SOURCE, "data/pirate/chat"),
             "--out", prepared, "--chat-template", "chatml", "--mask-prompt", "--max-seq-len", "96"], env)
        global_batch = 4
        common = ["--steps", "6", "--seq-len", "96", "--lr", "3e-3", "--warmup", "2", "--eval-every", "3",
                  "--eval-batches", "2", "--seed", "11", "--grad-accum", "2", "--log-every", "1"]
        cases = {
            "raw text windows": ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")],
            "prepared, masked, packed": ["--data", prepared],
        }
        if args.tcp:
            # ob1 explicitly: Debian builds OpenMPI with UCX, whose pml would bypass the btl list.
            tcp_mpirun = [args.mpirun, "--allow-run-as-root", "--oversubscribe", "--mca", "pml", "ob1", "--mca", "btl",
                          "tcp,self"]
            data = cases["raw text windows"]
            base = os.path.join(tmp, "tcp_1")
            run([args.flotilla, "train", "--model", model, "--out", base, "--batch-size", str(global_batch)] + data + common,
                env)
            for algorithm in ("auto", "ring", "hd", "hier", "mpi"):
                out = os.path.join(tmp, f"tcp_2_{algorithm}")
                run(tcp_mpirun + ["-np", "2", args.flotilla, "train", "--model", model, "--out", out,
                                  "--batch-size", str(global_batch // 2), "--allreduce", algorithm] + data + common,
                    env)
                failures += compare(f"tcp, --allreduce {algorithm}", base, out, 2)
            cases = {}
        for name, data in cases.items():
            base = os.path.join(tmp, name.replace(" ", "_").replace(",", "") + "_1")
            run([args.flotilla, "train", "--model", model, "--out", base, "--batch-size", str(global_batch)] + data + common,
                env)
            for ranks in (2, 4):
                out = os.path.join(tmp, name.replace(" ", "_").replace(",", "") + f"_{ranks}")
                # 2 ranks: the default mesh (dp = every process); 4: the mesh given as a flag.
                mesh = ["--parallel", "dp=4,pp=1,tp=1"] if ranks == 4 else []
                run(mpirun + ["-np", str(ranks), args.flotilla, "train", "--model", model, "--out", out,
                              "--batch-size", str(global_batch // ranks)] + mesh + data + common, env)
                failures += compare(name, base, out, ranks)
            if name.startswith("raw"):
                failures += overlapped_buckets(args.flotilla, mpirun, env, tmp, model, base, data, common, global_batch)
            if name.startswith("prepared"):
                failures += grad_checkpoint_on_two_ranks(args.flotilla, mpirun, env, tmp, model, base, data, common,
                                                         global_batch)
                failures += resume_on_other_world_sizes(args.flotilla, mpirun, env, tmp, model, base, data, common,
                                                        global_batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures)


if __name__ == "__main__":
    sys.exit(main())
