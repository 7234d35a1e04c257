#!/usr/bin/env python3
"""flotilla launch keeps a training job going when a rank is lost (issue 13 item 3).
Each case runs `flotilla launch` over mpirun on this machine:

  same      2 slots; rank 1 is killed (SIGKILL) after step 30: the launcher relaunches on 2 ranks
            from the newest checkpoint and the job completes; the final model is byte-identical
            to an uninterrupted run's (resuming on the same world size is exact), metrics.jsonl
            holds each step line once, its ledger of examples unbroken (every case checks
            it: each step begins where the one before ended), and the launcher's events (attempt_start x2,
            attempt_failed, training_again, complete).
  shrink    4 slots from a --discover script; rank 2 is killed and the script then offers 2:
            the relaunch runs 2 ranks with twice the accumulation (the global batch of 4 rows
            is kept: 1 row x 2 micro-batches each), resumed from the 4-rank checkpoint
            resharded; final weights within 1e-5 relative of the uninterrupted 4-rank run.
  grow      2 slots, then the --discover script offers 4: with --rescan the launcher stops the
            job at a step boundary (it checkpoints there) and relaunches on 4 ranks of 1 row;
            final weights within 1e-5 relative of the uninterrupted 2-rank run.
  per-host  as `same`, with a checkpoint folder per host (--checkpoint-dir 'DIR/{host}'): the
            relaunch resumes (train completes the folders), byte-identical again.
  give-up   --max-restarts 0: a killed rank ends the launch with one line, non-zero.
  partition 4 hosts (one machine: an mpirun wrapper puts every --host on localhost; a probe
            answers while a file exists); rank 2 is killed and 2 of the hosts stop
            answering: not a strict majority of the last world, so no second attempt, one
            line naming the hosts, non-zero, a no_majority event.
  refused   no answering host beyond this one with --min-hosts 2 (a probe that fails); a job
            without --save-every; a bad train flag (train's own line, alone); no job after
            `--`: one line each, non-zero, nothing run.
Usage: launch_test.py FLOTILLA [--mpirun M]
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import json

import numpy as np  # Debian's python3-numpy

from dist_util import mpi_env, rank_pids, script_args, summary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_equivalence_test import read_safetensors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))
MPIRUN_ARGS = "--allow-run-as-root --oversubscribe --mca btl self,vader,tcp"


class Job:
    """A launched command whose output is collected by a thread, so a test can wait for a line."""

    def __init__(self, cmd, env):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, needle, bound_s):
        end = time.time() + bound_s
        while time.time() < end:
            if any(needle in l for l in self.lines):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def finish(self, bound_s):
        try:
            self.proc.wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.reader.join(5)
            return None, "".join(self.lines)
        self.reader.join(5)
        return self.proc.returncode, "".join(self.lines)


def kill_rank(out_dir, rank, bound_s=30):
    end = time.time() + bound_s
    while time.time() < end:
        for pid, r in rank_pids(out_dir).items():
            if r == rank:
                os.kill(pid, signal.SIGKILL)
                return True
        time.sleep(0.1)
    return False


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def ledger_gaps(out_dir):
    """Where the ledger of examples breaks: each step line's "examples" [[epoch, position] where
    its global batch began, where the next begins] must begin where the step before ended, from
    [0, 0]: nothing skipped, nothing seen twice, across restarts. Empty when whole."""
    steps = [l for l in metrics(out_dir) if "loss" in l]
    gaps, end = [], [0, 0]
    for l in steps:
        if "examples" not in l:
            return [f"step {l['step']} has no ledger"]
        if l["examples"][0] != end:
            gaps.append(f"step {l['step']} begins at {l['examples'][0]}, the step before ended at {end}")
        end = l["examples"][1]
    return gaps


def relative_diff(a_path, b_path):
    """The largest |a - b| of any tensor over that tensor's largest |a|."""
    a, b = read_safetensors(a_path), read_safetensors(b_path)
    return max(float(np.max(np.abs(a[n] - b[n]))) / max(float(np.max(np.abs(a[n]))), 1e-30) for n in a)


def check_restarted(case, rc, out, ref, run, needles, exact=False):
    """The failures of a restarted launch: its exit, the launcher's lines it must print, the
    ledger, and the final weights against the uninterrupted run `ref` (byte-identical when
    `exact`, else within 1e-5 relative)."""
    if rc != 0:
        return [f"{case}: launch exited {rc}:\n{out[-3000:]}"]
    fails = [f"{case}: '{n}' missing from the launcher's output:\n{out[-2000:]}" for n in needles if n not in out]
    fails += [f"{case}: {g}" for g in ledger_gaps(run)]
    a, b = os.path.join(ref, "model.safetensors"), os.path.join(run, "model.safetensors")
    if exact:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            if fa.read() != fb.read():
                fails.append(f"{case}: the restarted run's model differs from the uninterrupted run's")
    else:
        d = relative_diff(a, b)
        print(f"{case:<8} worst relative weight difference {d:.3g}")
        if not d <= 1e-5:
            fails.append(f"{case}: weights differ by {d:.3g} relative (> 1e-5) from the uninterrupted run")
    return fails


def main():
    args = script_args()
    flotilla = os.path.abspath(args.flotilla)
    env = mpi_env()
    tmp = tempfile.mkdtemp(prefix="flotilla_launch_")
    failures = []
    cases = 0
    try:
        model = os.path.join(tmp, "model")
        subprocess.run([flotilla, "init", "--preset", "tiny", "--out", model], check=True, env=env,
                       stdout=subprocess.DEVNULL)

        # A tiny model steps in milliseconds on a quiet machine, and a kill must land while
        # the run still trains: RUN steps, killed after step 30 (past the checkpoint of step
        # 20), leave RUN - 30 steps (about 2 s quiet, more when the machine is busy and the
        # steps slow with it) for the kill to arrive, or for the launcher's rescan (0.2 s)
        # and its stop (SIGUSR1, passed on by mpirun at once) to stop the run to grow.
        RUN = 120

        def train(out, steps, batch, save_every=20, timeout=10):
            return ["train", "--model", model, "--data", os.path.join(SOURCE, "data/pirate/completions"),
                    "--batch-size", str(batch), "--seq-len", "64", "--steps", str(steps), "--save-every",
                    str(save_every), "--log-every", "1", "--timeout", str(timeout), "--out", out]

        def launch(extra, job, **kw):
            return Job([flotilla, "launch", "--mpirun", args.mpirun, "--mpirun-args", MPIRUN_ARGS,
                        *extra, "--", *job], kw.get("env", env))

        hostfile = os.path.join(tmp, "hosts")

        # -- same: 2 ranks, one killed, relaunched on 2: byte-identical to an uninterrupted run.
        cases += 1
        with open(hostfile, "w") as f:
            f.write("localhost slots=2\n")
        ref = os.path.join(tmp, "ref2")
        rc, out = launch(["--hostfile", hostfile], train(ref, RUN, 2)).finish(300)
        if rc != 0:
            failures.append(f"same: the uninterrupted launch failed ({rc}):\n{out[-3000:]}")
        run = os.path.join(tmp, "same")
        job = launch(["--hostfile", hostfile], train(run, RUN, 2))
        if not job.wait_for("step    30/", 120) or not kill_rank(run, 1):  # past the checkpoint of step 20
            failures.append("same: the run never reached step 30, or rank 1 was not found")
        rc, out = job.finish(300)
        print(f"same     rc={rc}")
        failures += check_restarted("same", rc, out, ref, run, ("attempt 2: 2 ranks", "from checkpoint step",
                                                                "training again", "the job completed",
                                                                "launch: timeline"), exact=True)
        if rc == 0:
            m = metrics(run)
            steps = [l["step"] for l in m if "loss" in l]
            if steps != list(range(1, RUN + 1)):
                failures.append(f"same: metrics.jsonl's step lines are not 1..{RUN} once each: {steps}")
            events = [l["event"] for l in m if "event" in l]
            for e in ("attempt_start", "attempt_failed", "training_again", "complete"):
                if e not in events:
                    failures.append(f"same: no {e} event in metrics.jsonl ({events})")
            if events.count("attempt_start") != 2:
                failures.append(f"same: expected 2 attempts, events: {events}")

        # -- per-host: the same with --checkpoint-dir 'DIR/ck-{host}' (a folder per host):
        # the launcher cannot read it, so it relaunches with --resume once a checkpoint line
        # was printed (never --force, which would clear the folders); byte-identical again.
        cases += 1
        run = os.path.join(tmp, "per_host")
        job = launch(["--hostfile", hostfile],
                     train(run, RUN, 2) + ["--checkpoint-dir", os.path.join(tmp, "per_host_ck-{host}")])
        if not job.wait_for("step    30/", 120) or not kill_rank(run, 1):
            failures.append("per-host: the run never reached step 30, or rank 1 was not found")
        rc, out = job.finish(300)
        print(f"per-host rc={rc}")
        failures += check_restarted("per-host", rc, out, ref, run,
                                    ("attempt 2: 2 ranks", "from the newest checkpoint the hosts hold together",
                                     "the job completed"), exact=True)

        # -- shrink: 4 ranks, then 2 offered: global batch kept, resharded resume, 1e-5.
        cases += 1
        offered = os.path.join(tmp, "offered")
        with open(offered, "w") as f:
            f.write("localhost slots=4\n")
        discover = ["--discover", f"cat {offered}"]
        ref4 = os.path.join(tmp, "ref4")
        rc, out = launch(discover, train(ref4, RUN, 1)).finish(400)
        if rc != 0:
            failures.append(f"shrink: the uninterrupted 4-rank launch failed ({rc}):\n{out[-3000:]}")
        run = os.path.join(tmp, "shrink")
        job = launch(discover, train(run, RUN, 1))
        if not job.wait_for("step    30/", 200):
            failures.append("shrink: the run never reached step 30")
        with open(offered, "w") as f:
            f.write("localhost slots=2\n")
        if not kill_rank(run, 2):
            failures.append("shrink: rank 2 was not found")
        rc, out = job.finish(400)
        print(f"shrink   rc={rc}")
        failures += check_restarted("shrink", rc, out, ref4, run, (
            "attempt 2: 2 ranks on 1 host (localhost:2), 1 row x 2 micro-batches each = 4 rows per step",))

        # -- grow: 2 slots, then 4 answer: stopped at a step boundary, relaunched on 4.
        cases += 1
        with open(offered, "w") as f:
            f.write("localhost slots=2\n")
        ref2 = os.path.join(tmp, "ref2b")
        rc, out = launch(discover, train(ref2, RUN, 2)).finish(400)
        if rc != 0:
            failures.append(f"grow: the uninterrupted 2-rank launch failed ({rc}):\n{out[-3000:]}")
        run = os.path.join(tmp, "grow")
        job = launch(discover + ["--rescan", "0.2"], train(run, RUN, 2))
        if not job.wait_for("step    12/", 200):
            failures.append("grow: the run never reached step 12")
        with open(offered, "w") as f:
            f.write("localhost slots=4\n")
        rc, out = job.finish(400)
        print(f"grow     rc={rc}")
        failures += check_restarted("grow", rc, out, ref2, run, (
            "4 ranks answer now (2 run)", "stopped after step",
            "attempt 2: 4 ranks on 1 host (localhost:4), 1 row x 1 micro-batch each = 4 rows per step"))
        if rc == 0:
            starts = [l for l in metrics(run) if l.get("event") == "attempt_start"]
            print(f"grow     resumed at step {starts[-1]['resume_step']} on {starts[-1]['world']} ranks")
            if len(starts) != 2 or not starts[1]["resume_step"] < RUN or starts[1]["world"] != 4:
                failures.append(f"grow: expected a second attempt on 4 ranks resuming before step {RUN}: {starts}")

        # -- give-up: no restarts allowed.
        cases += 1
        with open(hostfile, "w") as f:
            f.write("localhost slots=2\n")
        run = os.path.join(tmp, "giveup")
        job = launch(["--hostfile", hostfile, "--max-restarts", "0"], train(run, RUN, 2))
        if not job.wait_for("step     7/", 120) or not kill_rank(run, 1):
            failures.append("give-up: the run never reached step 7, or rank 1 was not found")
        rc, out = job.finish(120)
        print(f"give-up  rc={rc}")
        if rc in (0, None) or "--max-restarts 0 reached" not in out:
            failures.append(f"give-up: expected a non-zero exit naming --max-restarts, got {rc}:\n{out[-2000:]}")

        # -- partition: 4 hosts (localhost and three names an mpirun wrapper places on this
        # machine too; a probe answers for each while its file exists). Rank 2 is killed and
        # hc and hd stop answering: 2 of the last world's 4 hosts is not a strict majority,
        # so the launcher stops with one line instead of training on its side.
        cases += 1
        wrapper = os.path.join(tmp, "mpirun-one-machine")
        with open(wrapper, "w") as f:
            f.write("#!/usr/bin/python3\n# Every host of --host is this machine: the slots are summed on localhost.\n"
                    "import os, sys\nargs = sys.argv[1:]\ni = args.index('--host')\n"
                    "args[i + 1] = 'localhost:%d' % sum(int(h.split(':')[1]) for h in args[i + 1].split(','))\n"
                    f"os.execvp({args.mpirun!r}, [{args.mpirun!r}] + args)\n")
        os.chmod(wrapper, 0o755)
        four = os.path.join(tmp, "four")
        with open(four, "w") as f:
            f.write("localhost slots=1\nhb slots=1\nhc slots=1\nhd slots=1\n")
        for h in ("hb", "hc", "hd"):
            open(os.path.join(tmp, f"up-{h}"), "w").close()
        run = os.path.join(tmp, "partition")
        # Short timeouts: the case only needs the first attempt to end.
        job = Job([flotilla, "launch", "--mpirun", wrapper, "--mpirun-args", MPIRUN_ARGS, "--hostfile", four,
                   "--probe", f"test -e {tmp}/up-{{host}}", "--grace", "2", "--", *train(run, RUN, 1, timeout=2)], env)
        if not job.wait_for("step     7/", 120):
            failures.append("partition: the run never reached step 7")
        for h in ("hc", "hd"):
            os.remove(os.path.join(tmp, f"up-{h}"))
        if not kill_rank(run, 2):
            failures.append("partition: rank 2 was not found")
        rc, out = job.finish(120)
        print(f"partition rc={rc}")
        # The ranks' lines on the kill may come first; the launcher's is the last, and the only
        # one on the majority.
        errors = [l for l in out.splitlines() if l.startswith("flotilla: error:")]
        want = "2 of the last world's 4 hosts answer (localhost, hb; not hc, hd)"
        if rc in (0, None) or not errors or want not in errors[-1] or "strict majority" not in errors[-1] \
                or sum("strict majority" in l for l in errors) != 1 or "attempt 2:" in out:
            failures.append(f"partition: expected no second attempt and one line '{want} ... strict majority', got "
                            f"rc={rc}:\n{out[-2500:]}")
        elif "no_majority" not in [l.get("event") for l in metrics(run)]:
            failures.append("partition: no no_majority event in metrics.jsonl")

        # -- refused: bad launches stop before running anything.
        cases += 1
        two = os.path.join(tmp, "two")
        with open(two, "w") as f:
            f.write("localhost slots=1\nunreachable-host slots=1\n")
        refusals = [
            (["--hostfile", two, "--probe", "false", "--min-hosts", "2"], train(os.path.join(tmp, "r1"), 5, 1),
             "only 1 host answer (--min-hosts 2)"),
            (["--hostfile", hostfile], train(os.path.join(tmp, "r2"), 5, 1, save_every=0), "the job needs --save-every N"),
            (["--hostfile", hostfile], train(os.path.join(tmp, "r3"), 5, 1) + ["--lr", "fast"], "--lr"),
            (["--hostfile", hostfile], [], "give the job after `--`"),
        ]
        for extra, job_args, needle in refusals:
            rc, out = launch(extra, job_args).finish(60)
            errors = [l for l in out.splitlines() if l.startswith("flotilla: error:")]
            if rc in (0, None) or len(errors) != 1 or needle not in errors[0]:
                failures.append(f"refused: expected one error line with '{needle}', got rc={rc}:\n{out[-1500:]}")
            if any(os.path.exists(os.path.join(tmp, r)) for r in ("r1", "r2", "r3")):
                failures.append("refused: a refused launch trained")
        print("refused  done")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures, cases)


if __name__ == "__main__":
    sys.exit(main())
