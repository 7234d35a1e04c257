#!/usr/bin/python3
"""A run that diverges, or that is interrupted, stops cleanly and keeps its work (issue 18,
items 2 and 5). Usage: run_stop_test.py <path/to/flotilla> [-k SUBSTRING] [--keep]

Cases, each `flotilla train` on the tiny preset and raw text:
  diverge_lr        --lr 1e30 --save-every 1: the loss turns non-finite; the run stops with
                    one error line naming the step and the value, exit 1, writes no model,
                    and every checkpoint it wrote holds finite weights; metrics.jsonl is
                    strict JSON (no NaN); --resume then stops the same way (one line, no
                    JSON type error).
  inf_weight        an Inf in the input weights (also with --on-nonfinite skip): refused before
                    the first step, naming the tensor, exit 2, no model and no output folder.
  sigint, sigterm, sigusr1
                    the first signal (--save-every 0): the step ends, a checkpoint is
                    written, one line says how to resume, exit 130 / 143 / 138 (SIGUSR1 is
                    the stop mpirun passes on, for flotilla launch); --resume then finishes
                    the run.
  second_signal     two signals at once: exit 130 at once, no checkpoint.
Every case ends within a bound (a hang fails) and prints no crash marker.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import cli_helpers

BOUND_S = 60.0
CRASH_MARKERS = ("AddressSanitizer", "runtime error", "Segmentation", "terminate called", "Aborted",
                 "core dumped", "type_error", "json.exception")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
           ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
SOURCE = Path(__file__).resolve().parents[2]
CORPUS = SOURCE / "data" / "sample" / "corpus.txt"


def strict_json(text):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def safetensors_floats(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        assert entry["dtype"] == "F32", entry
        begin, end = entry["data_offsets"]
        yield name, struct.unpack(f"<{(end - begin) // 4}f", data[begin:end])


def all_finite(path):
    return all(v == v and abs(v) != float("inf") for _, vals in safetensors_floats(path) for v in vals)


def put_inf_weight(model):
    """Sets the first float of the final norm's weight (which every logit goes through) to +Inf."""
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    begin = 8 + n + header[name]["data_offsets"][0]
    raw[begin:begin + 4] = struct.pack("<f", float("inf"))
    path.write_bytes(bytes(raw))


def train_argv(flotilla, model, out, *extra):
    return [flotilla, "train", "--model", str(model), "--data", str(CORPUS), "--out", str(out),
            "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--log-every", "1", *extra]


def run(argv):
    proc = subprocess.run(argv, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BOUND_S)
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(stderr):
    return [l for l in stderr.splitlines() if l.strip()]


def check_common(problems, stdout, stderr):
    for marker in CRASH_MARKERS:
        if marker in stdout or marker in stderr:
            problems.append(f"crash marker {marker!r} in the output")


def case_diverge_lr(flotilla, tmp):
    problems = []
    out = tmp / "out"
    argv = train_argv(flotilla, tmp / "model", out, "--steps", "6", "--save-every", "1", "--lr", "1e30",
                      "--warmup", "0")
    rc, stdout, stderr = run(argv)
    check_common(problems, stdout, stderr)
    lines = error_lines(stderr)
    if rc != 1:
        problems.append(f"exit {rc}, expected 1")
    if len(lines) != 1 or not lines[0].startswith("flotilla: error:"):
        problems.append(f"expected one error line, got {lines}")
    elif not ("step " in lines[0] and "diverged" in lines[0] and ("nan" in lines[0] or "inf" in lines[0])):
        problems.append(f"the line does not name the step and the value: {lines[0]}")
    if (out / "model.safetensors").exists():
        problems.append("a model was written")
    steps = sorted((out / "checkpoints").glob("step-*"))
    if not steps:
        problems.append("no checkpoint kept (step 1 is finite)")
    for step in steps:
        rank_files = sorted(step.glob("rank-*.safetensors"))  # weights, m, v of each rank's part
        if not rank_files:
            problems.append(f"{step.name} has no rank file")
        if not all(all_finite(f) for f in rank_files):
            problems.append(f"{step.name} holds non-finite weights")
    for i, line in enumerate((out / "metrics.jsonl").read_text().splitlines()):
        try:
            strict_json(line)
        except ValueError as e:
            problems.append(f"metrics.jsonl line {i + 1} is not JSON: {e}")
    # Resuming reads that metrics.jsonl and the checkpoint: the same clean stop.
    rc, stdout, stderr = run(argv + ["--resume"])
    check_common(problems, stdout, stderr)
    lines = error_lines(stderr)
    if rc != 1 or len(lines) != 1 or "diverged" not in lines[0]:
        problems.append(f"--resume: exit {rc}, stderr {lines}")
    return problems


def case_inf_weight(flotilla, tmp, policy):
    problems = []
    out = tmp / "out"
    put_inf_weight(tmp / "model")
    rc, stdout, stderr = run(train_argv(flotilla, tmp / "model", out, "--steps", "3", "--on-nonfinite", policy))
    check_common(problems, stdout, stderr)
    last = error_lines(stderr)[-1:] or [""]
    if rc != 2:
        problems.append(f"exit {rc}, expected 2")
    if not (last[0].startswith("flotilla: error:") and "model.norm.weight" in last[0] and "inf" in last[0]):
        problems.append(f"the last stderr line does not name the tensor and the value: {last[0]}")
    if out.exists():
        problems.append("an output folder was made")
    return problems


def case_signal(flotilla, tmp, signals, expect_rc, expect_checkpoint, grad_accum=4):
    problems = []
    out = tmp / "out"
    # Steps of 0.1 - 1 s (by grad_accum), so that a second signal sent right after the first
    # lands inside the step.
    argv = train_argv(flotilla, tmp / "model", out, "--steps", "100000", "--eval-every", "0", "--grad-accum",
                      str(grad_accum))
    argv[argv.index("--batch-size") + 1] = "16"
    argv[argv.index("--seq-len") + 1] = "256"
    proc = subprocess.Popen(argv, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < BOUND_S:  # two progress lines: the loop runs
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("step "):
            seen += 1
            if seen == 2:
                break
    if seen < 2:
        proc.kill()
        return [f"training never started: {proc.communicate()}"]
    early_stderr = ""
    for i, sig in enumerate(signals):
        proc.send_signal(sig)
        if i + 1 < len(signals):
            # Two signals pending at once merge into one: wait for the first one's notice.
            while "stopping after the current step" not in early_stderr:
                line = proc.stderr.readline()
                if not line:
                    break
                early_stderr += line
    try:
        stdout, stderr = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return [f"no exit within {BOUND_S} s of the signal (hang)"]
    stderr = early_stderr + stderr
    check_common(problems, stdout, stderr)
    lines = error_lines(stderr)
    if proc.returncode != expect_rc:
        problems.append(f"exit {proc.returncode}, expected {expect_rc}")
    latest = out / "checkpoints" / "latest"
    if expect_checkpoint:
        name = signal.Signals(signals[0]).name
        if not lines or not (lines[-1].startswith("flotilla: error:") and name in lines[-1] and "--resume" in lines[-1]):
            problems.append(f"the last line does not name {name} and --resume: {lines[-1:]}")
        if not latest.is_file():
            return problems + ["no checkpoint written"]
        step = int(latest.read_text().strip().split("-")[1])
        # Resume to two steps past the stop: it finishes and writes the model.
        resume = train_argv(flotilla, tmp / "model", out, "--steps", str(step + 2), "--resume")
        rc, rout, rerr = run(resume)
        check_common(problems, rout, rerr)
        if rc != 0 or f"at step {step}" not in rout or not (out / "model.safetensors").is_file():
            problems.append(f"--resume after the stop: exit {rc}: {rerr.strip()[-500:]}")
    else:
        if latest.exists():
            problems.append("a checkpoint was written after a second signal")
        if not any("second signal" in l for l in lines):
            problems.append(f"no notice of the second signal: {lines}")
    return problems


def main():
    args = cli_helpers.parse_args(__doc__)
    flotilla = args.flotilla
    cases = {
        "diverge_lr": lambda t: case_diverge_lr(flotilla, t),
        "inf_weight_stop": lambda t: case_inf_weight(flotilla, t, "stop"),
        "inf_weight_skip": lambda t: case_inf_weight(flotilla, t, "skip"),
        "sigint": lambda t: case_signal(flotilla, t, [signal.SIGINT], 130, True),
        "sigterm": lambda t: case_signal(flotilla, t, [signal.SIGTERM], 143, True),
        "sigusr1": lambda t: case_signal(flotilla, t, [signal.SIGUSR1], 138, True),
        "second_signal": lambda t: case_signal(flotilla, t, [signal.SIGINT, signal.SIGINT], 130, False,
                                                grad_accum=8),
    }
    with cli_helpers.temp_root("flotilla-run-stop-", args.keep) as root:
        model = root / "model"
        cli_helpers.init_tiny(flotilla, model, 1, ENV)

        def in_own_folder(name, fn):
            """The case on its own copy of the model, failing with the problems it found."""
            def run():
                tmp = root / name
                tmp.mkdir()
                shutil.copytree(model, tmp / "model")
                problems = fn(tmp)
                cli_helpers.check(not problems, "".join(f"\n     - {p}" for p in problems))
            return run

        return cli_helpers.run_cases([(name, in_own_folder(name, fn)) for name, fn in cases.items()], args.select)


if __name__ == "__main__":
    sys.exit(main())
