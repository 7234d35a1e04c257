#!/usr/bin/env python3
"""--balance: each rank's share of the global batch follows its measured speed, and the
result is still the global batch's.

One rank is made slow with the test hook FLOTILLA_TEST_SLOW_RANK=RANK:FACTOR (it sleeps
FACTOR - 1 times its forward and backward after each micro-batch). Every run trains the same
global batch of 12 rows a step for 12 steps, the balancer re-cutting it every 3 steps:
  - 3 ranks x 2 rows x 2 micro-batches, --deterministic, rank 1 eight times as slow: the
    model files (raw text windows) equal the unbalanced 1-rank run's byte for byte (cmp)
    and so do the logged losses; every step line's "rank_rows" adds up to 12 with at least
    one row per micro-batch; after the first re-cut rank 1 runs fewer rows than each other
    rank, and after the second fewer than an equal share at every step; resumed from its
    checkpoint of step 6, it runs steps 7-9 with the same shares (the checkpoint keeps them)
    and ends in the same bytes;
  - 2 ranks x 3 rows x 2 micro-batches, the default mode, rank 0 eight times as slow: the
    losses within 1e-5 relative of the unbalanced 1-rank run's, the weights within 1e-4 of
    each tensor's largest value (train_equivalence_test's tolerances for N ranks against
    1); rank 0 runs fewer rows as above; on prepared chat data (packed rows: the ranks'
    target tokens differ) the ledger of examples ("examples" of each step line) is unbroken;
and the combinations it refuses give one error line and exit 2.
Usage: balance_test.py FLOTILLA [--mpirun MPIRUN]
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
STEPS = 12
EVERY = 3


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return {name: np.frombuffer(data[info["data_offsets"][0]:info["data_offsets"][1]], dtype="<f4").reshape(info["shape"])
            for name, info in header.items() if name != "__metadata__"}


def model_files(out):
    return sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "*.safetensors")))


def steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]


def train(flotilla, mpirun, tmp, name, ranks, rows, micro, args, slow=None):
    out = os.path.join(tmp, name)
    env = mpi_env(**({"FLOTILLA_TEST_SLOW_RANK": slow} if slow else {}))
    launcher = mpirun_argv(mpirun, "-np", str(ranks)) if ranks > 1 else []
    run(launcher + [flotilla, "train", "--out", out, "--batch-size", str(rows), "--grad-accum", str(micro)] + args, env)
    return out


def check_shares(case, out, ranks, micro, slow_rank):
    """Every step's rows add up to the global batch, each rank at least one per micro-batch;
    the slow rank runs fewer rows than each other rank over the steps after the first re-cut,
    and fewer than an equal share at every step after the second. (Not "the fewest at every
    step": the speeds are measured on a machine that other jobs load, and one window's
    measure can be off by 2x; the smoothed ones settle.)"""
    failures = []
    lines = steps(out)
    if len(lines) != STEPS:
        return [f"{case}: {len(lines)} step lines, expected {STEPS}"]
    for line in lines:
        rows = line.get("rank_rows")
        if not rows or len(rows) != ranks or sum(rows) != GLOBAL_ROWS or min(rows) < micro:
            failures.append(f"{case}: step {line['step']} has rank_rows {rows}")
    if failures:
        return failures
    totals = [sum(line["rank_rows"][r] for line in lines[EVERY:]) for r in range(ranks)]
    if not all(totals[slow_rank] < totals[r] for r in range(ranks) if r != slow_rank):
        failures.append(f"{case}: after the first re-cut the slow rank {slow_rank} ran {totals[slow_rank]} rows, "
                        f"the ranks {totals}")
    for line in lines[2 * EVERY:]:
        if line["rank_rows"][slow_rank] * ranks >= GLOBAL_ROWS:
            failures.append(f"{case}: step {line['step']}: the slow rank {slow_rank} still runs {line['rank_rows']}")
    print(f"{case:<13} rank_rows per step: {[line.get('rank_rows') for line in lines]}")
    return failures


def identical(case, out, base, from_step=0):
    """Byte-identical model files, and the same losses (a run resumed at `from_step`: from there on)."""
    failures = []
    files = model_files(base)
    if not files or model_files(out) != files:
        return [f"{case}: wrote {model_files(out)}, the 1-rank run {files}"]
    for f in files:
        with open(os.path.join(base, f), "rb") as a, open(os.path.join(out, f), "rb") as b:
            if a.read() != b.read():
                failures.append(f"{case}: {f} differs from the unbalanced 1-rank run's")
    if [s["loss"] for s in steps(out)] != [s["loss"] for s in steps(base)][from_step:]:
        failures.append(f"{case}: the logged losses differ from the unbalanced 1-rank run's")
    print(f"{case:<13} against 1 rank: {'identical' if not failures else 'DIFFERENT'}")
    return failures


def close(case, out, base):
    # The data-parallel tolerances of train_equivalence_test: losses 1e-5 relative, weights
    # 1e-4 of each tensor's largest (float32 sums in another order, through 8 AdamW steps).
    failures = []
    worst_loss = max(abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12) for a, b in zip(steps(out), steps(base)))
    worst_w = 0.0
    for f in model_files(base):
        wa, wb = read_safetensors(os.path.join(base, f)), read_safetensors(os.path.join(out, f))
        for t in wa:
            worst_w = max(worst_w, float(np.abs(wa[t] - wb[t]).max()) / max(float(np.abs(wa[t]).max()), 1e-12))
    if not model_files(base) or model_files(out) != model_files(base):
        failures.append(f"{case}: wrote {model_files(out)}, the 1-rank run {model_files(base)}")
    if worst_loss > 1e-5 or worst_w > 1e-4:
        failures.append(f"{case}: against 1 rank, loss rel err {worst_loss:.2e} (bound 1e-5), weight rel err "
                        f"{worst_w:.2e} (bound 1e-4)")
    print(f"{case:<13} against 1 rank: max loss rel err {worst_loss:.2e}, max weight rel err {worst_w:.2e}")
    return failures


def ledger_unbroken(case, out):
    """Each step's global batch starts where the previous one ended."""
    lines = steps(out)
    ledger = [line.get("examples") for line in lines]
    if any(e is None for e in ledger):
        return [f"{case}: a step line has no ledger of examples"]
    breaks = [lines[i]["step"] for i in range(1, len(ledger)) if ledger[i][0] != ledger[i - 1][1]]
    print(f"{case:<13} ledger of examples: {'unbroken' if not breaks else f'broken at steps {breaks}'}")
    return [f"{case}: the ledger breaks at steps {breaks}"] if breaks else []


def same_shares_after_resume(case, out, resumed):
    """A run resumed from the checkpoint of step 2 x EVERY (a window's end) runs the steps of
    the next window with the shares the uninterrupted run had there: the checkpoint keeps
    them (they are not re-measured from equal shares)."""
    first = 2 * EVERY
    want = [line.get("rank_rows") for line in steps(out)[first:first + EVERY]]
    got = [line.get("rank_rows") for line in steps(resumed)[:EVERY]]
    print(f"{case:<13} steps {first + 1}-{first + EVERY}: rank_rows {got}, uninterrupted {want}")
    return [] if got == want else [f"{case}: resumed at step {first}, steps {first + 1}-{first + EVERY} ran rank_rows "
                                   f"{got}, the uninterrupted run {want}"]


def refusals(flotilla, tmp, model, data):
    failures = []
    for extra, word in [(["--sync-every", "4"], "local SGD"), (["--balance-every", "0"], "--balance-every")]:
        cmd = [flotilla, "train", "--model", model, "--out", os.path.join(tmp, "refused"), "--steps", "1", "--warmup",
               "0", "--balance"] + data + extra
        proc = subprocess.run(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or word not in lines[0]:
            failures.append(f"--balance {' '.join(extra)}: exit {proc.returncode}, stderr {proc.stderr!r}")
        else:
            print(f"refused: --balance {' '.join(extra)}: {lines[0]}")
    return failures


def main():
    args = script_args()
    env = mpi_env()
    tmp = tempfile.mkdtemp(prefix="flotilla_balance_")
    failures = []
    try:
        model = os.path.join(tmp, "model")
        run([args.flotilla, "init", "--preset", "tiny", "--out", model, "--seed", "5"], env)
        prepared = os.path.join(tmp, "prepared")
        run([args.flotilla, "data", "prepare", "--model", model, "--data", os.path.join(SOURCE, "data/pirate/chat"),
             "--out", prepared, "--chat-template", "chatml", "--max-seq-len", "48"], env)
        common = ["--model", model, "--steps", str(STEPS), "--lr", "3e-3", "--warmup", "2", "--seed", "11",
                  "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--seq-len", "32"]
        text = common + ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")]
        chat = common + ["--data", prepared]
        balance = ["--balance", "--balance-every", str(EVERY)]

        base = train(args.flotilla, args.mpirun, tmp, "det_1", 1, GLOBAL_ROWS, 1, text + ["--deterministic"])
        out = train(args.flotilla, args.mpirun, tmp, "det_3_bal", 3, 2, 2,
                    text + ["--deterministic", "--save-every", str(2 * EVERY)] + balance, slow="1:8")
        failures += identical("deterministic", out, base)
        failures += check_shares("deterministic", out, 3, 2, 1)
        checkpoint = os.path.join(out, "checkpoints", f"step-{2 * EVERY:06d}")
        resumed = train(args.flotilla, args.mpirun, tmp, "det_3_resumed", 3, 2, 2,
                        text + ["--deterministic", "--resume", checkpoint] + balance, slow="1:8")
        failures += identical("resumed", resumed, base, from_step=2 * EVERY)
        failures += same_shares_after_resume("resumed", out, resumed)

        base = train(args.flotilla, args.mpirun, tmp, "default_1", 1, GLOBAL_ROWS, 1, chat)
        out = train(args.flotilla, args.mpirun, tmp, "default_2_bal", 2, 3, 2, chat + balance, slow="0:8")
        failures += close("default", out, base)
        failures += check_shares("default", out, 2, 2, 0)
        failures += ledger_unbroken("default", out)

        failures += refusals(args.flotilla, tmp, model, ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures)


if __name__ == "__main__":
    sys.exit(main())
