"""What the tests/cli scripts share: the check that fails a case, the checks of an exit
(success, or one error line), a workspace of numbered folders to run the binary in, the
case runner with its command line (flotilla, -k, --keep), and soft checks that note a
failure and go on.

The scripts import it as `import cli_helpers`: python3 puts a script's own folder first on
sys.path, so the import works from any working directory (ctest runs them by full path).
"""

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Sequence, Tuple

CASE_TIMEOUT_S = 120.0


class Failure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def expect_ok(p: subprocess.CompletedProcess) -> None:
    check(p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")


def expect_error(p: subprocess.CompletedProcess, needles: Sequence[str]) -> None:
    """Exit 2 (InputError) and one stderr line, "flotilla: error: ...", naming every needle."""
    check(p.returncode == 2, f"exit {p.returncode}, expected 2\nstdout: {p.stdout}\nstderr: {p.stderr}")
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    check(len(lines) == 1 and lines[0].startswith("flotilla: error:"), f"stderr is not one error line: {p.stderr!r}")
    for n in needles:
        check(n in lines[0], f"{n!r} not in {lines[0]!r}")


def printed_config(text: str) -> dict:
    """The `key: value` lines of --print-config (commented lines are unset options)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("#") and ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out


def metrics_steps(out: Path) -> List[dict]:
    """The training steps' records of out/metrics.jsonl."""
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def init_tiny(flotilla: str, out: Path, seed: int, env=None) -> None:
    """A tiny random model (flotilla init --preset tiny, byte tokenizer) in `out`."""
    subprocess.run([flotilla, "init", "--preset", "tiny", "--seed", str(seed), "--out", str(out)], check=True,
                   capture_output=True, env=env, timeout=CASE_TIMEOUT_S)


@contextlib.contextmanager
def temp_tiny_model(flotilla: str, seed: int) -> Iterator[Tuple[Path, Path]]:
    """(root, model): a temp directory, removed afterwards, with a tiny model in root/model."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_tiny(flotilla, root / "model", seed)
        yield root, root / "model"


class Workspace:
    """The binary, run one thread wide, and numbered folders under one root."""

    def __init__(self, flotilla: str, root: Path):
        self.flotilla = flotilla
        self.root = root
        self.env = dict(os.environ)
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.env.setdefault("OPENBLAS_NUM_THREADS", "1")
        self.counter = 0

    def path(self, name: str) -> Path:
        self.counter += 1
        return self.root / f"{self.counter:02d}-{name}"

    def run(self, args: Sequence) -> subprocess.CompletedProcess:
        return subprocess.run([self.flotilla, *map(str, args)], capture_output=True, text=True, env=self.env,
                              timeout=CASE_TIMEOUT_S)


def parse_args(doc: str) -> argparse.Namespace:
    """flotilla (made absolute), -k SUBSTRING, --keep; exits when flotilla is no executable."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("flotilla", help="path to the flotilla binary")
    parser.add_argument("-k", dest="select", default="", help="run only cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory and print its path")
    args = parser.parse_args()
    args.flotilla = os.path.abspath(args.flotilla)
    if not os.access(args.flotilla, os.X_OK):
        sys.exit(f"not an executable: {args.flotilla}")
    return args


@contextlib.contextmanager
def temp_root(prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh temp directory, removed afterwards unless `keep` (then its path is printed)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def cases_of(namespace: dict) -> List[Tuple[str, Callable]]:
    """The functions named case_* of a module (its globals()), by name, without the prefix."""
    return [(name[len("case_"):], fn) for name, fn in sorted(namespace.items()) if name.startswith("case_")]


def run_cases(cases: Iterable[Tuple[str, Callable[[], None]]], select: str) -> int:
    """Runs each case whose name contains `select`: a case fails by raising Failure (or a
    timeout, a missing key or file, a bad value). Prints a line per case and a count;
    returns the exit code."""
    passed = failed = 0
    for name, fn in cases:
        if select not in name:
            continue
        started = time.monotonic()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.monotonic() - started:.1f} s)")
        except subprocess.TimeoutExpired as x:
            failed += 1
            print(f"FAIL {name}: no exit within {x.timeout} s (hang): {x.cmd}")
        except (Failure, KeyError, OSError, ValueError) as x:
            failed += 1
            print(f"FAIL {name} ({time.monotonic() - started:.1f} s): {x}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main_of_cases(namespace: dict, temp_prefix: str, workspace: Callable[[str, Path], object]) -> int:
    """The main() of a script of case_* functions (namespace: its globals()): each case is
    given the one workspace(flotilla, root) made for the run, in a temp root."""
    args = parse_args(namespace["__doc__"])
    with temp_root(temp_prefix, args.keep) as root:
        ws = workspace(args.flotilla, root)
        return run_cases([(name, functools.partial(fn, ws)) for name, fn in cases_of(namespace)], args.select)


class SoftChecks:
    """Checks that print ok / FAIL and go on; exit() ends the script non-zero if any failed."""

    def __init__(self):
        self.failures: List[str] = []

    def __call__(self, condition: bool, what: str) -> None:
        print(("ok   " if condition else "FAIL ") + what)
        if not condition:
            self.failures.append(what)

    def exit(self) -> None:
        if self.failures:
            sys.exit(f"{len(self.failures)} failure(s)")
