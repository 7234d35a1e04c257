#!/usr/bin/env python3
"""A data-parallel job stops cleanly on a signal, and never waits for ever at start-up
(issue 18, items 1 and 5). Each case runs `flotilla train` under mpirun with 2 ranks:

  sigterm   rank 1 alone gets SIGTERM mid-run (as a scheduler's kill of one task would):
            every rank stops after the same step (no rank is left waiting in a collective,
            so no timeout is reported), rank 0 writes a checkpoint and says how to resume,
            the job exits non-zero; the same command with --resume then finishes the run.
  ctrl-c    mpirun itself gets SIGINT (Ctrl-C): it sends SIGTERM to the ranks and stops
            reading their output; the ranks must not block writing progress into that
            pipe, so a checkpoint is written before mpirun's SIGKILL (grace 5 s here), and
            --resume continues from it.
  startup   rank 1 starts 60 s late, so rank 0 waits in MPI start-up: with --timeout 3 the
            job ends within a bound with one line naming MPI start-up.
Usage: interrupt_test.py FLOTILLA [--mpirun M]
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


def resume(mpirun, train, latest, env):
    """The stopped job run again with --resume, to two steps past the checkpoint `latest`
    names: (that step, exit code, output)."""
    step = int(open(latest).read().strip().split("-")[1])
    rc, out = finish(launch(mpirun + train + ["--steps", str(step + 2), "--resume"], env), 120)
    print(f"resume   rc={rc} from step {step}")
    return step, rc, out


def main():
    args = script_args()
    flotilla = os.path.abspath(args.flotilla)
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun, "-np", "2")
    tmp = tempfile.mkdtemp(prefix="flotilla_interrupt_")
    failures = []
    try:
        model = os.path.join(tmp, "model")
        subprocess.run([flotilla, "init", "--preset", "tiny", "--out", model], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        out_dir = os.path.join(tmp, "run")
        train = [flotilla, "train", "--model", model, "--data", os.path.join(SOURCE, "data/sample/corpus.txt"),
                 "--batch-size", "2", "--seq-len", "64", "--log-every", "1", "--timeout", "10", "--out", out_dir]

        # -- sigterm: one rank signalled, every rank stops after the same step.
        proc = launch(mpirun + train + ["--steps", "100000"], env)
        started, victim = time.time(), None
        while time.time() - started < 60 and victim is None:  # both ranks in the loop
            time.sleep(1.0)
            pids = rank_pids(out_dir)
            if len(pids) == 2 and os.path.isdir(out_dir) and time.time() - started > 4:
                victim = next(p for p, r in pids.items() if r == 1)
        if victim is None:
            os.killpg(proc.pid, signal.SIGKILL)
            failures.append(f"sigterm: the ranks never started:\n{proc.communicate()[0][-2000:]}")
        else:
            os.kill(victim, signal.SIGTERM)
            hit = time.time()
            rc, out = finish(proc, 60)
            lines = [l for l in out.splitlines() if "stopped by SIGTERM" in l]
            print(f"sigterm  rc={rc} after {time.time() - hit:.1f}s: {lines[:1]}")
            latest = os.path.join(out_dir, "checkpoints", "latest")
            if rc in (None, 0):
                failures.append(f"sigterm: rc={rc}, expected a non-zero exit:\n{out[-2000:]}")
            elif "timed out" in out or len(lines) != 1 or "--resume" not in lines[0]:
                failures.append(f"sigterm: expected one line from rank 0 naming SIGTERM and --resume, no "
                                f"timeout:\n{out[-2000:]}")
            elif not os.path.isfile(latest):
                failures.append("sigterm: no checkpoint written")
            else:
                step, rc, out = resume(mpirun, train, latest, env)
                if rc != 0 or f"at step {step}" not in out or not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
                    failures.append(f"sigterm: --resume from step {step}: rc={rc}:\n{out[-2000:]}")

        # -- ctrl-c: mpirun's own abort (SIGTERM to the ranks, output no longer read).
        ctrl_dir = os.path.join(tmp, "ctrl_c")
        ctrl_train = train[:]
        ctrl_train[ctrl_train.index("--out") + 1] = ctrl_dir
        ctrl_mpirun = mpirun[:1] + ["--mca", "odls_base_sigkill_timeout", "5"] + mpirun[1:]
        proc = launch(ctrl_mpirun + ctrl_train + ["--steps", "100000"], env)
        started = time.time()
        while time.time() - started < 60 and not (len(rank_pids(ctrl_dir)) == 2 and time.time() - started > 4):
            time.sleep(1.0)
        os.kill(proc.pid, signal.SIGINT)  # mpirun only, as the terminal's Ctrl-C reaches it
        hit = time.time()
        rc, out = finish(proc, 60)
        latest = os.path.join(ctrl_dir, "checkpoints", "latest")
        print(f"ctrl-c   rc={rc} after {time.time() - hit:.1f}s, checkpoint: {os.path.isfile(latest)}")
        if rc in (None, 0) or not os.path.isfile(latest):
            failures.append(f"ctrl-c: rc={rc}, expected a non-zero exit and a checkpoint:\n{out[-2000:]}")
        else:
            step, rc, out = resume(mpirun, ctrl_train, latest, env)
            if rc != 0 or f"at step {step}" not in out:
                failures.append(f"ctrl-c: --resume from step {step}: rc={rc}:\n{out[-2000:]}")

        # -- startup: a rank that never reaches MPI_Init must not hold the other for ever.
        late = f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then sleep 60; fi; exec "$0" "$@"'
        start_train = train[:]
        start_train[start_train.index("--timeout") + 1] = "3"
        start_train[start_train.index("--out") + 1] = os.path.join(tmp, "late")
        started = time.time()
        rc, out = finish(launch(mpirun + ["sh", "-c", late] + start_train + ["--steps", "2"], env), 30)
        lines = [l for l in out.splitlines() if "MPI start-up did not finish within 3 s" in l]
        print(f"startup  rc={rc} after {time.time() - started:.1f}s: {lines[:1]}")
        if rc in (None, 0) or not lines:
            failures.append(f"startup: rc={rc}, expected a non-zero exit within 30 s naming MPI start-up:\n{out[-2000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures, cases=3)


if __name__ == "__main__":
    sys.exit(main())
