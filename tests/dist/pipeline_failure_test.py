#!/usr/bin/env python3
"""Pipeline parallelism refuses what it cannot run, and a lost stage ends the job (issue 15).

Bad input, each under mpirun (the tiny preset: 2 layers), one clear "error:" line and exit 2
before any step, nothing written into --out:
  - pp=4 on 4 ranks for a model of 2 layers;
  - --pp-layers not adding up to the layers, or not one count per stage;
  - --micro-batches 3 with --batch-size 4;
  - pp with --zero 2, with local SGD (--sync-every 2), with --compression fp16;
  - --micro-batches 2 alone (no pipeline).
A stage lost mid-run, 2 ranks pp=2: rank 1 killed (SIGKILL) or stopped (SIGSTOP) while
training; the job exits non-zero within a bound (--timeout 4 plus a margin), never hangs.
Usage: pipeline_failure_test.py FLOTILLA [--mpirun MPIRUN]
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import finish, launch, mpi_env, mpirun_argv, rank_pids, script_args, summary  # noqa: E402

SOURCE = os.path.dirname(os.path.dirname(HERE))


def main():
    args = script_args()
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun)
    tmp = tempfile.mkdtemp(prefix="flotilla_ppfail_")
    failures = []
    cases = 0
    f = args.flotilla
    try:
        model = os.path.join(tmp, "model")
        subprocess.run([f, "init", "--preset", "tiny", "--out", model], check=True, env=env, stdout=subprocess.DEVNULL)
        train = ["train", "--model", model, "--data", os.path.join(SOURCE, "data/sample/corpus.txt"), "--steps", "3",
                 "--batch-size", "4", "--seq-len", "32", "--timeout", "20"]
        bad = [
            (4, ["--parallel", "pp=4"], "pp=4 stages for a model of 2 layers"),
            (2, ["--parallel", "pp=2", "--pp-layers", "2,1"], "--pp-layers 2,1 adds up to 3 layers, but the model has 2"),
            (2, ["--parallel", "pp=2", "--pp-layers", "2"], "--pp-layers 2 gives 1 stages, but the mesh has pp=2"),
            (2, ["--parallel", "pp=2", "--micro-batches", "3"], "--micro-batches 3 does not divide --batch-size 4"),
            (2, ["--parallel", "pp=2", "--zero", "2"], "pipeline parallelism (pp > 1) does not work with --zero 2"),
            (2, ["--parallel", "pp=2", "--sync-every", "2"], "does not work with local SGD"),
            (2, ["--parallel", "pp=2", "--compression", "fp16"], "does not work with --compression"),
            (1, ["--micro-batches", "2"], "--micro-batches applies to pipeline parallelism"),
        ]
        for i, (ranks, extra, expected) in enumerate(bad):
            out = os.path.join(tmp, f"bad{i}")
            cmd = (mpirun + ["-np", str(ranks)] if ranks > 1 else []) + [f] + train + ["--out", out] + extra
            started = time.time()
            proc = launch(cmd, env)
            rc, text = finish(proc, 60)
            errors = sorted({l for l in text.splitlines() if "error:" in l})
            print(f"{' '.join(extra):<50} rc={rc} {time.time() - started:.1f}s {errors[:1]}")
            cases += 1
            if rc is None:
                failures.append(f"{extra}: hung")
            elif rc == 0:
                failures.append(f"{extra}: exit 0")
            elif not any(expected in l for l in errors):
                failures.append(f"{extra}: no error line saying {expected!r}:\n{text[-2000:]}")
            elif ranks == 1 and rc != 2:
                failures.append(f"{extra}: exit {rc}, not 2")
            if os.path.exists(os.path.join(out, "model.safetensors")):
                failures.append(f"{extra}: a model was written")

        long_train = train[:]
        long_train[long_train.index("--steps") + 1] = "100000"
        long_train[long_train.index("--timeout") + 1] = "4"
        long_train += ["--parallel", "pp=2", "--micro-batches", "2", "--log-every", "1000"]
        for name, sig in (("killed", signal.SIGKILL), ("silent", signal.SIGSTOP)):
            out_dir = os.path.join(tmp, name)
            started = time.time()
            proc = launch(mpirun + ["-np", "2", f] + long_train + ["--out", out_dir], env)
            victim = None
            while time.time() - started < 60 and victim is None:  # until both stages train
                time.sleep(1.0)
                pids = rank_pids(out_dir)
                if len(pids) == 2 and os.path.exists(out_dir) and time.time() - started > 4:
                    victim = next(p for p, r in pids.items() if r == 1)
            cases += 1
            if victim is None:
                failures.append(f"{name}: the ranks never started")
                os.killpg(proc.pid, signal.SIGKILL)
                continue
            os.kill(victim, sig)
            hit = time.time()
            rc, text = finish(proc, 60)
            print(f"stage lost ({name}): rc={rc} after {time.time() - hit:.1f}s")
            if rc is None:
                failures.append(f"{name}: the job was still running 60 s after stage 1 was {name}")
            elif rc == 0:
                failures.append(f"{name}: exit 0 after losing a stage")
            if name == "silent" and rc is not None and "timed out" not in text:
                failures.append(f"silent: no timeout reported:\n{text[-2000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures, cases)


if __name__ == "__main__":
    sys.exit(main())
