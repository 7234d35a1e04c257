"""What the multi-rank test scripts share: the environment mpirun needs here, running a
command that must succeed, and the closing summary line that ctest reads."""
import os
import subprocess


def mpi_env(**extra):
    """One OpenMP thread per rank (the ranks already share the cores), mpirun allowed as
    root, and the shared-memory transport without its ptrace single-copy path (containers
    forbid it)."""
    return dict(os.environ, OMP_NUM_THREADS="1", OMPI_MCA_btl_vader_single_copy_mechanism="none",
                OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)


def run(cmd, env):
    """Runs cmd; on failure prints its output and ends the test. Returns its output."""
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stdout)
        raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def summary(failures):
    """Prints every failure and the count line; returns the exit code."""
    for f in failures:
        print("FAIL:", f)
    print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
    return 1 if failures else 0
