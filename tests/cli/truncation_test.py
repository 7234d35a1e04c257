#!/usr/bin/python3
"""No silent data loss between `data prepare` and `train` (issue 17.1).

Usage: truncation_test.py <path/to/flotilla> [--keep]

On a tiny random model with the byte tokenizer (one token per byte, so every count below
is known in closed form), a prompt/completion data folder is prepared with --mask-prompt
--max-seq-len 64, then trained on. Checked:

1. `data prepare` says in words how many examples its cut shortened, how many target
   tokens that lost, and how many it left out because the cut left them no target.
2. `train` without --seq-len uses rows of the prepared --max-seq-len (64): nothing cut,
   no warning.
3. `train --seq-len 32` says how many training examples its rows cut and how many target
   tokens that loses, warns of the examples left with no target, skips every global batch
   made only of them with a line (never a step with loss 0), and counts the skips in
   report.json.
4. `train --seq-len 8`, where no example keeps a target, is refused up front (exit 2, one
   error line, no output folder).
5. `plan` on the prepared data models rows of its --max-seq-len too, as train would.

Without --chat-template and with no template in the model, {"prompt","completion"} is
BOS + prompt + completion + EOS, the completion and EOS in the loss.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 120


def fail(message: str) -> None:
    sys.exit(f"FAIL: {message}")


def run(flotilla, *args, env, expect_rc=0):
    proc = subprocess.run([flotilla, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    if proc.returncode != expect_rc:
        fail(f"flotilla {' '.join(map(str, args))} exited {proc.returncode}, expected {expect_rc}:\n"
             f"{proc.stdout}\n{proc.stderr}")
    return proc


def expect_in(text: str, needle: str, what: str) -> None:
    if needle not in text:
        fail(f"{what}: expected {needle!r} in:\n{text}")


def main() -> int:
    flotilla = sys.argv[1]
    keep = "--keep" in sys.argv[2:]
    root = Path(tempfile.mkdtemp(prefix="flotilla-truncation-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", FLOTILLA_PROGRESS="lines")
    try:
        model = root / "model"
        run(flotilla, "init", "--preset", "tiny", "--seed", "1", "--out", model, env=env)
        # (prompt bytes, completion bytes, copies): tokens n = 2 + p + c, targets c + 1.
        #   A 10+10 x4: 22 tokens, 11 targets, fits everywhere
        #   B 40+5  x2: 47 tokens,  6 targets, all past position 32
        #   C 70+4  x1: 76 tokens, cut at 64 inside the prompt: no target left, left out
        #   D 50+20 x1: 72 tokens, cut at 64: keeps 13 of 21 targets, all past position 32
        kinds = [(10, 10, 4), (40, 5, 2), (70, 4, 1), (50, 20, 1)]
        data = root / "data"
        data.mkdir()
        lines = [json.dumps({"prompt": "p" * p, "completion": "c" * c}) for p, c, k in kinds for _ in range(k)]
        (data / "train.jsonl").write_text("\n".join(lines) + "\n")
        (data / "valid.jsonl").write_text("\n".join(lines[:2]) + "\n")
        prepared = root / "prepared"
        out = run(flotilla, "data", "prepare", "--model", model, "--data", data, "--out", prepared,
                  "--mask-prompt", "--max-seq-len", "64", env=env).stdout
        # Targets 4*11 + 2*6 + 5 + 21 = 82; lost 5 (C) + 8 (D).
        expect_in(out, "train: 2 of 8 examples are longer than --max-seq-len 64 and were cut: 13 of 82 target "
                       "tokens lost (15.9%); 1 of them kept no target token", "prepare summary")
        index = json.loads((prepared / "index.json").read_text())["splits"]["train"]
        if index["skipped"] != {"no_targets_after_truncation": 1} or index["truncated_targets"] != 13:
            fail(f"index.json train split: {index}")

        # 2. Rows as long as the prepared data: nothing cut.
        whole = root / "whole"
        out = run(flotilla, "train", "--model", model, "--data", prepared, "--out", whole, "--steps", "2",
                  "--batch-size", "2", "--eval-batches", "1", env=env).stdout
        expect_in(out, "data: rows of 64 tokens", "train without --seq-len")
        if "warning" in out:
            fail(f"train at the prepared length warned:\n{out}")
        if json.loads((whole / "report.json").read_text())["config"]["train"]["seq_len"] != 64:
            fail("report.json does not record the sequence length the run used (64)")

        # 3. Shorter rows: the cut is said, empty batches are skipped, never stepped on.
        short = root / "short"
        proc = run(flotilla, "train", "--model", model, "--data", prepared, "--out", short, "--seq-len", "32",
                   "--steps", "6", "--batch-size", "1", "--no-pack", "--log-every", "1", "--eval-batches", "1",
                   env=env)
        out = proc.stdout
        # Stored: A x4 (fits), B x2 and D cut at 32; targets 44 + 12 + 13 = 69, lost 12 + 13.
        expect_in(out, "warning: 3 of 7 training examples do not fit in rows of --seq-len 32: 25 of 69 target "
                       "tokens (36.2%) past the row are never trained on; --seq-len 64 keeps them all",
                  "train --seq-len 32")
        expect_in(out, "warning: 3 training examples keep no target token in a row of 32", "train --seq-len 32")
        # Six steps need six of the four good examples per epoch: the whole first epoch is
        # drawn, its three empty examples among it, each alone in a batch of one.
        report = json.loads((short / "report.json").read_text())
        if report["skipped_batches_without_targets"] < 3:
            fail(f"report.json counts {report['skipped_batches_without_targets']} skipped batches, expected >= 3")
        expect_in(out, "skipped 1 batch with no target token", "train --seq-len 32")
        steps = [json.loads(line) for line in (short / "metrics.jsonl").read_text().splitlines()]
        losses = [s["loss"] for s in steps if "loss" in s]
        if len(losses) != 6 or min(losses) <= 0.0:
            fail(f"expected 6 steps, each with a positive loss: {losses}")

        # 4. Nothing to learn at this length: refused before anything is written.
        none = root / "none"
        proc = run(flotilla, "train", "--model", model, "--data", prepared, "--out", none, "--seq-len", "8",
                   "--steps", "2", env=env, expect_rc=2)
        err = proc.stderr.strip().splitlines()
        if len(err) != 1 or not err[0].startswith("flotilla: error:") or "nothing to learn" not in err[0]:
            fail(f"expected one error line saying there is nothing to learn, got:\n{proc.stderr}")
        if none.exists():
            fail(f"{none} was created by a run refused up front")
        # 5. plan models the run train would make: rows of the prepared length.
        out = run(flotilla, "plan", "--model", model, "--data", prepared, "--batch-size", "2", "--hosts", "2",
                  "--no-run", env=env).stdout
        expect_in(out, "--seq-len 64", "plan on prepared data")
        print("PASS: prepare and train say what truncation cuts; empty batches are skipped, not stepped on")
        return 0
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
