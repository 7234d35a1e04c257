#!/usr/bin/env python3
"""A data-parallel job that loses a rank ends, quickly and clearly; it never hangs.

Cases, each under mpirun with 2 ranks of `flotilla train`:
  killed   rank 1 is killed (SIGKILL) mid-run: the job exits non-zero and says which rank;
  silent   rank 1 is stopped (SIGSTOP) mid-run: rank 0's collective times out after
           --timeout (naming rank 1 when it stopped before the collective's check; inside
           the payload no rank can tell who is late), and the job exits non-zero;
  mismatch the ranks are given different models: one line naming the ranks that differ;
  doctor   `flotilla doctor` passes on identical models and fails naming the rank otherwise;
           with --parallel dp=2,tp=2 on 4 ranks it prints each rank's mesh coordinates and
           an all-reduce in every tp and dp group; a mesh that is not the world is one line.
Each must end within a bound (the timeout plus a margin). Usage: failure_test.py FLOTILLA [--mpirun M]
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from dist_util import finish, launch, mpi_env, mpirun_argv, rank_pids, script_args, summary

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))


def main():
    args = script_args()
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun)
    tmp = tempfile.mkdtemp(prefix="flotilla_fail_")
    failures = []
    try:
        model_a, model_b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        subprocess.run([args.flotilla, "init", "--preset", "tiny", "--out", model_a], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run([args.flotilla, "init", "--preset", "15M", "--out", model_b], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        train = ["train", "--data", os.path.join(SOURCE, "data/sample/corpus.txt"), "--steps", "100000",
                 "--batch-size", "2", "--seq-len", "64", "--log-every", "1000", "--timeout", "4"]

        for name, sig in (("killed", signal.SIGKILL), ("silent", signal.SIGSTOP)):
            out_dir = os.path.join(tmp, name)
            started = time.time()
            proc = launch(mpirun + ["-np", "2", args.flotilla] + train + ["--model", model_a, "--out", out_dir], env)
            victim = None
            while time.time() - started < 60 and victim is None:  # wait until both ranks train
                time.sleep(1.0)
                pids = rank_pids(out_dir)
                if len(pids) == 2 and os.path.exists(out_dir) and time.time() - started > 4:
                    victim = next(p for p, r in pids.items() if r == 1)
            if victim is None:
                failures.append(f"{name}: the ranks never started")
                os.killpg(proc.pid, signal.SIGKILL)
                continue
            os.kill(victim, sig)
            hit = time.time()
            rc, out = finish(proc, 60)
            took = time.time() - hit
            last = [l for l in out.splitlines() if "rank" in l.lower() and ("error" in l.lower() or "exited" in l.lower()
                                                                              or "signal" in l.lower())]
            print(f"{name:<8} rc={rc} after {took:.1f}s: {last[:2]}")
            if rc is None:
                failures.append(f"{name}: the job was still running 60 s after rank 1 was {name}")
            elif rc == 0:
                failures.append(f"{name}: exit 0 after losing a rank")
            elif name == "killed" and not any("rank 1" in l for l in last):
                failures.append(f"{name}: no line names rank 1:\n{out[-2000:]}")
            if name == "silent" and rc is not None and not any("timed out" in l for l in out.splitlines()):
                failures.append(f"silent: no timeout reported:\n{out[-2000:]}")

        # Different models on the two ranks (MPMD launch): one clear line, non-zero exit.
        started = time.time()
        proc = launch(mpirun + ["-np", "1", args.flotilla] + train + ["--model", model_a, "--out", os.path.join(tmp, "m")]
                      + [":", "-np", "1", args.flotilla] + train + ["--model", model_b, "--out", os.path.join(tmp, "m")],
                      env)
        rc, out = finish(proc, 60)
        took = time.time() - started
        lines = [l for l in out.splitlines() if "ranks see different" in l]
        print(f"mismatch rc={rc} after {took:.1f}s: {lines[:1]}")
        if rc in (None, 0) or not lines or "rank 1" not in lines[0]:
            failures.append(f"mismatch: rc={rc}, expected one line naming rank 1:\n{out[-2000:]}")

        # flotilla doctor: the same model on both ranks passes; different models are an error.
        doctor = [args.flotilla, "doctor", "--max-bytes", "65536", "--model"]
        rc, out = finish(launch(mpirun + ["-np", "2"] + doctor + [model_a], env), 60)
        print(f"doctor   rc={rc} (same model)")
        if rc != 0 or "all 2 ranks see the same" not in out:
            failures.append(f"doctor: rc={rc} with identical models:\n{out[-2000:]}")
        rc, out = finish(launch(mpirun + ["-np", "1"] + doctor + [model_a, ":", "-np", "1"] + doctor + [model_b], env),
                         60)
        print(f"doctor   rc={rc} (different models)")
        if rc in (None, 0) or "model: rank 1 differs from rank 0" not in out:
            failures.append(f"doctor: rc={rc} with different models:\n{out[-2000:]}")
        # doctor --parallel: each rank's place in the mesh and every group's all-reduce.
        rc, out = finish(launch(mpirun + ["-np", "4", args.flotilla, "doctor", "--max-bytes", "65536", "--parallel",
                                          "dp=2,tp=2"], env), 120)
        print(f"doctor   rc={rc} (mesh dp=2,tp=2)")
        rows = [l.split() for l in out.splitlines() if len(l.split()) == 5 and l.split()[0].isdigit()]
        coords = sorted((int(r[0]), int(r[2]), int(r[3]), int(r[4])) for r in rows)
        if (rc != 0 or "mesh dp=2,pp=1,tp=2" not in out
                or coords != [(0, 0, 0, 0), (1, 0, 0, 1), (2, 1, 0, 0), (3, 1, 0, 1)]
                or "in every tp group (2 ranks each)" not in out or "in every dp group (2 ranks each)" not in out):
            failures.append(f"doctor: rc={rc} with --parallel dp=2,tp=2 (coordinates {coords}):\n{out[-2000:]}")
        rc, out = finish(launch(mpirun + ["-np", "2", args.flotilla, "doctor", "--parallel", "dp=4"], env), 60)
        errors = [l for l in out.splitlines() if l.startswith("flotilla: error:")]
        if rc in (None, 0) or not errors or "dp=4" not in errors[0]:
            failures.append(f"doctor: --parallel dp=4 on 2 ranks: rc={rc}:\n{out[-2000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures, cases=5)


if __name__ == "__main__":
    sys.exit(main())
