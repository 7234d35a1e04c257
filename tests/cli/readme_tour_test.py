#!/usr/bin/python3
"""The README's quick tour runs as printed (issue 17.2): every command of its ```sh block,
read from README.md itself so that the README cannot drift from what works.

Usage: readme_tour_test.py <path/to/flotilla> [--readme README.md] [--keep] [--list]

The block under the "## A quick tour" heading is split into commands (a trailing `\\` joins
lines; `#` lines are comments) and each runs in order with bash in a fresh directory laid
out as the repository root: `configs/` and `data/` link to the source tree's, and
`build/flotilla` to the binary under test. Runs and models land in that directory. Only
what makes the tour small is changed, and each change is printed:

  --steps N -> 3, --save-every N -> 2, --max-tokens N -> 8   (small step counts)
  plan: --measure-steps 2 --warmup-steps 1 appended           (a short timed run)
  mpirun: --allow-run-as-root --oversubscribe --bind-to none   (root in a container, 2 cores)

Each command must exit 0; the first that does not fails the test with its output. The tour's
LoRA trainings on the data it prepares must not cut examples (train reads the prepared
--max-seq-len: issue 17.1). The "two commands" block above the tour (scripts/demo,
scripts/test) is not run here: it builds and runs everything, for minutes.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

SOURCE = Path(__file__).resolve().parents[2]
TOUR_HEADING = "## A quick tour"
COMMAND_TIMEOUT_S = 300
SMALL_VALUES = {"--steps": "3", "--save-every": "2", "--max-tokens": "8"}
EXTRA_FLAGS = {"plan": ["--measure-steps", "2", "--warmup-steps", "1"]}
MPIRUN_FLAGS = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def tour_commands(readme: Path) -> List[str]:
    """The commands of the ```sh block under TOUR_HEADING, continuation lines joined."""
    lines = readme.read_text().splitlines()
    try:
        start = lines.index(TOUR_HEADING)
    except ValueError:
        sys.exit(f"FAIL: {readme} has no '{TOUR_HEADING}' heading")
    i = start + 1
    while i < len(lines) and not lines[i].startswith("```sh"):
        if lines[i].startswith("## "):
            sys.exit(f"FAIL: no ```sh block under '{TOUR_HEADING}' in {readme}")
        i += 1
    commands, current = [], ""
    for line in lines[i + 1:]:
        if line.startswith("```"):
            break
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        commands.append((current + stripped).strip())
        current = ""
    else:
        sys.exit(f"FAIL: the ```sh block under '{TOUR_HEADING}' in {readme} is not closed")
    if current:
        sys.exit(f"FAIL: the tour's last command ends with a line continuation: {current}")
    if not commands:
        sys.exit(f"FAIL: the ```sh block under '{TOUR_HEADING}' in {readme} has no command")
    return commands


def small(command: str) -> str:
    """The command with small step counts and what mpirun needs here."""
    for flag, value in SMALL_VALUES.items():
        command = re.sub(rf"(?<!\S){re.escape(flag)}(\s+|=)\S+", rf"{flag}\g<1>{value}", command)
    words = shlex.split(command, comments=False, posix=True)
    if words and words[0] == "mpirun":
        command = "mpirun " + " ".join(MPIRUN_FLAGS) + command[len("mpirun"):]
    for sub, flags in EXTRA_FLAGS.items():
        if re.search(rf"build/flotilla\s+{sub}\b", command) and not any(f in command for f in flags[::2]):
            command += " " + " ".join(flags)
    return command


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("flotilla")
    parser.add_argument("--readme", default=str(SOURCE / "README.md"))
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--list", action="store_true", help="print the commands as they would run, and stop")
    args = parser.parse_args()
    commands = tour_commands(Path(args.readme))
    if args.list:
        for c in commands:
            print(small(c))
        return 0

    root = Path(tempfile.mkdtemp(prefix="flotilla-readme-tour-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", FLOTILLA_PROGRESS="lines",
               # Containers forbid the shared-memory transport's single-copy (ptrace) path.
               OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_btl="self,vader,tcp")
    started = time.monotonic()
    try:
        for name in ("configs", "data"):
            (root / name).symlink_to(SOURCE / name)
        (root / "build").mkdir()
        (root / "build" / "flotilla").symlink_to(Path(args.flotilla).resolve())
        for n, command in enumerate(commands, 1):
            run = small(command)
            print(f"[{n}/{len(commands)}] {run}", flush=True)
            t0 = time.monotonic()
            try:
                proc = subprocess.run(["bash", "-c", run], cwd=root, env=env, capture_output=True, text=True,
                                      timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                sys.exit(f"FAIL: README tour command {n} ran past {COMMAND_TIMEOUT_S} s:\n  {command}")
            if proc.returncode != 0:
                sys.exit(f"FAIL: README tour command {n} exited {proc.returncode}:\n  {command}\n(run as: {run})\n"
                         f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}")
            print(f"      ok in {time.monotonic() - t0:.1f} s", flush=True)
            if " train " in f" {run} " and "do not fit in rows" in proc.stdout:
                sys.exit(f"FAIL: README tour command {n} cuts training examples:\n  {command}\n{proc.stdout}")
        print(f"PASS: {len(commands)} README tour commands in {time.monotonic() - started:.0f} s")
        return 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
