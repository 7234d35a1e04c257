"""What the multi-rank test scripts share: the environment mpirun needs here, running a
command that must succeed, a job started in its own process group and ended within a bound,
and the closing summary line that ctest reads."""
import os
import signal
import subprocess


def mpi_env(**extra):
    """One OpenMP thread per rank (the ranks already share the cores), mpirun allowed as
    root, and the shared-memory transport without its ptrace single-copy path (containers
    forbid it)."""
    return dict(os.environ, OMP_NUM_THREADS="1", OMPI_MCA_btl_vader_single_copy_mechanism="none",
                OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)


def script_args(*extra):
    """The command line every dist script takes: FLOTILLA [--mpirun MPIRUN], then `extra`
    (argparse add_argument tuples: (("--name",), {...}))."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("flotilla")
    ap.add_argument("--mpirun", default="mpirun")
    for names, kwargs in extra:
        ap.add_argument(*names, **kwargs)
    return ap.parse_args()


def mpirun_argv(mpirun, *more):
    """mpirun as root with more ranks than cores, over shared memory (or TCP) only."""
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader,tcp", *more]


def run(cmd, env):
    """Runs cmd; on failure prints its output and ends the test. Returns its output."""
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stdout)
        raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def init_model(flotilla, config, tmp, env, seed=5):
    """A model directory tmp/model made by `flotilla init` from the config.json dict
    `config` (written to tmp/config.json). Returns (the config.json path, the model dir)."""
    import json
    path = os.path.join(tmp, "config.json")
    with open(path, "w") as out:
        json.dump(config, out)
    model = os.path.join(tmp, "model")
    run([flotilla, "init", "--config", path, "--out", model, "--seed", str(seed)], env)
    return path, model


def rank_pids(out_dir):
    """pid -> rank of the running ranks of the `flotilla train` job writing into out_dir;
    other jobs, this test's or anyone's, may run beside it."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        # A rank still in the `sh -c` that starts it late (interrupt_test's startup case) is not one yet.
        if (out_dir.encode() in cmd and b"train" in cmd and b"OMPI_COMM_WORLD_RANK" in env
                and os.path.basename(cmd[0]) != b"sh"):
            found[int(pid)] = int(env[b"OMPI_COMM_WORLD_RANK"])
    return found


def launch(cmd, env):
    """Starts cmd in its own process group (so that a hang can be killed whole), its stderr
    merged into stdout."""
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, bound_s):
    """(exit code, or None after a hang that was then killed; output) of a launched job."""
    try:
        out, _ = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out


def summary(failures, cases=1):
    """Prints every failure and the count line over `cases` cases; returns the exit code."""
    for f in failures:
        print("FAIL:", f)
    failed = min(len(failures), cases)
    print(f"{cases - failed} passed, {failed} failed")
    return 1 if failures else 0
