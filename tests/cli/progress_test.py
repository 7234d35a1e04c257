#!/usr/bin/python3
"""Training output a log file can hold: under mpirun (which gives ranks a pseudo-terminal)
progress is plain lines, never a bar redrawn with carriage returns; every progress line has
an ETA; a run no longer than its warm-up says so. The run report says how to reproduce the
run (fine-tune type, LoRA settings, version, date, command line), with integer steps, and
its chart is named after the run with labelled axes. --help shows booleans plainly and
describes every flag.

Usage: progress_test.py <path/to/flotilla>
"""
import json
import os
import shutil
import subprocess
import sys

import cli_helpers

FLOTILLA = sys.argv[1]


def main():
    check = cli_helpers.SoftChecks()
    with cli_helpers.temp_tiny_model(FLOTILLA, 3) as (root, model):
        (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
        train = ["train", "--model", str(model), "--data", str(root / "corpus.txt"), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--log-every", "1"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("FLOTILLA_PROGRESS", None)

        plain = subprocess.run([FLOTILLA, *train, "--out", str(root / "plain_run"), "--fine-tune-type", "lora",
                                "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,v"],
                               capture_output=True, text=True, env=env, timeout=120)
        check(plain.returncode == 0, f"train runs: {plain.stderr[-300:]}")
        steps = [l for l in plain.stdout.splitlines() if l.lstrip().startswith("step ") and " loss " in l and "validation" not in l]
        check(len(steps) == 3 and all(" eta " in l for l in steps), f"every progress line has an ETA: {steps}")
        check("no longer than its warm-up" in plain.stdout, "a run shorter than its warm-up says so")
        report = json.loads((root / "plain_run" / "report.json").read_text())
        check(report.get("fine_tune_type") == "lora", "report: fine-tune type")
        lora = report.get("lora", {})
        check(lora.get("rank") == 4 and lora.get("alpha") == 8 and lora.get("targets") == ["q_proj", "v_proj"]
              and "num_layers" in lora, f"report: LoRA settings {lora}")
        check("--lora-rank 4" in report.get("command_line", "") and report.get("flotilla_version")
              and report.get("date"), "report: command line, version, date")
        check(all(isinstance(p[0], int) for p in report["train_loss"]), "report: integer steps")
        svg = (root / "plain_run" / "loss.svg").read_text()
        check("Loss: plain_run" in svg and ">loss</text>" in svg and ">step</text>" in svg,
              "chart: the run's name and both axis labels")

        # --help: booleans plainly (no CLI11 "{false}" notation), every flag described.
        for command in ["train", "generate", "chat", "eval", "plan", "data prepare", "convert", "fuse", "score", "init",
                        "grads", "doctor"]:
            text = subprocess.run([FLOTILLA, *command.split(), "--help"], capture_output=True, text=True).stdout
            lines = text.splitlines()
            # Option lines are indented two spaces ("  --name TYPE=DEFAULT  description");
            # a description too long for the line, or names too long for the column, go on
            # the lines below, indented past the names' column.
            options = [(i, l.strip()) for i, l in enumerate(lines) if l.startswith("  -")]
            names = [o.split()[0] for _, o in options]
            check(not any("{" in n for n in names), f"{command} --help shows negatable flags plainly: {names}")
            undescribed = [o for i, o in options
                           if "  " not in o and len(o.split()) < 4
                           and not (i + 1 < len(lines) and lines[i + 1].startswith(" " * 20) and lines[i + 1].strip())]
            check(not undescribed, f"{command} --help describes every flag: {undescribed}")

        mpirun = shutil.which("mpirun")
        if mpirun is None:
            print("skip: no mpirun")
        else:
            mpi = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "1", FLOTILLA, *train,
                                  "--out", str(root / "mpi")], capture_output=True, text=True, env=env, timeout=180)
            check(mpi.returncode == 0, f"train under mpirun runs: {mpi.stderr[-300:]}")
            check("\r" not in mpi.stdout and "] step" not in mpi.stdout,
                  f"no bar (carriage returns, [###...]) under mpirun: {mpi.stdout[:300]!r}")
            check(sum(1 for l in mpi.stdout.splitlines() if " eta " in l) == 3, "one line per step under mpirun")

    check.exit()


if __name__ == "__main__":
    main()
