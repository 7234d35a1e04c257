#!/usr/bin/python3
"""flotilla train -c config.yaml: values from the file are applied, command-line flags win, and bad files fail clearly.

Usage: config_file_test.py <path/to/flotilla> [-k SUBSTRING] [--keep]

Each case writes a YAML file in a temporary directory and runs the binary on a tiny random
model for a few steps. What was applied is read back two ways: `--print-config` (the
resolved flags, itself a valid -c file) and metrics.jsonl (the learning rate and tokens the
trainer actually used). Error cases must exit with 2 (InputError) and print one line on
stderr that starts with "flotilla: error:" and names the file (and the line, for a value).
"""

import sys
from pathlib import Path

import cli_helpers
from cli_helpers import check, expect_error, expect_ok, metrics_steps
from cli_helpers import printed_config as parse_printed


class Env(cli_helpers.Workspace):
    """A corpus of repeated words, and config files written into numbered folders."""

    def __init__(self, flotilla: str, root: Path):
        super().__init__(flotilla, root)
        self.corpus = root / "corpus.txt"
        words = "the fleet sails as one while each ship holds what it must of the model".split()
        self.corpus.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(30))
                                           for i in range(80)) + "\n")

    def yaml(self, text: str) -> Path:
        p = self.path("config.yaml")
        p.write_text(text)
        return p

    def base_yaml(self, extra: str = "") -> Path:
        return self.yaml(f"# a tiny run\npreset: tiny\ndata: {self.corpus}\nsteps: 2\nbatch_size: 2\n"
                         f"seq_len: 16\nlr: 0.004\nwarmup: 1\neval_batches: 1\n{extra}")


# ---- Cases ------------------------------------------------------------------------------

def case_values_from_the_file_are_applied(e: Env) -> None:
    cfg = e.base_yaml("min_lr: 0.0004\nweight_decay: 0.05\n")
    printed = e.run(["train", "-c", cfg, "--out", e.path("out"), "--print-config"])
    expect_ok(printed)
    got = parse_printed(printed.stdout)
    for key, value in {"preset": "tiny", "steps": "2", "batch_size": "2", "seq_len": "16", "lr": "0.004",
                       "min_lr": "0.0004", "weight_decay": "0.05", "warmup": "1", "grad_accum": "1"}.items():
        check(got.get(key) == value, f"{key}: printed {got.get(key)!r}, expected {value!r}")
    out = e.path("out")
    expect_ok(e.run(["train", "-c", cfg, "--out", out]))
    steps = metrics_steps(out)
    check(len(steps) == 2, f"{len(steps)} steps, expected 2")
    check(abs(steps[0]["lr"] - 0.004) < 1e-9, f"first lr {steps[0]['lr']}, expected 0.004 (warm-up of 1 step)")
    check(steps[0]["tokens"] == 2 * 16, f"tokens per step {steps[0]['tokens']}, expected batch_size x seq_len = 32")


def case_command_line_flags_win(e: Env) -> None:
    cfg = e.base_yaml()
    out = e.path("out")
    printed = e.run(["train", "-c", cfg, "--out", out, "--lr", "0.001", "--steps", "3", "--print-config"])
    expect_ok(printed)
    got = parse_printed(printed.stdout)
    check(got.get("lr") == "0.001" and got.get("steps") == "3", f"command line lost: {got}")
    check(got.get("batch_size") == "2", f"file value lost: {got}")
    expect_ok(e.run(["train", "-c", cfg, "--out", out, "--lr", "0.001", "--steps", "3"]))
    steps = metrics_steps(out)
    check(len(steps) == 3, f"{len(steps)} steps, expected 3 from --steps")
    check(abs(steps[0]["lr"] - 0.001) < 1e-9, f"first lr {steps[0]['lr']}, expected 0.001 from --lr")


def case_command_line_model_replaces_the_files_preset(e: Env) -> None:
    model = e.path("model")
    expect_ok(e.run(["init", "--preset", "tiny", "--out", model]))
    printed = e.run(["train", "-c", e.base_yaml(), "--model", model, "--out", e.path("out"), "--print-config"])
    expect_ok(printed)
    got = parse_printed(printed.stdout)
    check("preset" not in got and got.get("model") == str(model), f"--model did not replace preset: {got}")


def case_flags_take_yaml_booleans(e: Env) -> None:
    got = parse_printed(e.run(["train", "-c", e.base_yaml("pack: no\nforce: yes\n"), "--out", e.path("out"),
                               "--print-config"]).stdout)
    check(got.get("pack") == "false" and got.get("force") == "true", f"pack/force: {got}")
    got = parse_printed(e.run(["train", "-c", e.base_yaml("pack: false\n"), "--pack", "--out", e.path("out"),
                               "--print-config"]).stdout)
    check(got.get("pack") == "true", f"--pack on the command line lost: {got}")


def case_printed_config_reads_back(e: Env) -> None:
    first = e.run(["train", "-c", e.base_yaml("pack: false\n"), "--out", e.path("out"), "--seed", "7",
                   "--print-config"])
    expect_ok(first)
    again_file = e.yaml(first.stdout)
    again = e.run(["train", "-c", again_file, "--print-config"])
    expect_ok(again)
    check(again.stdout == first.stdout, f"round trip differs:\n{first.stdout}\n---\n{again.stdout}")


def case_unknown_key_names_file_and_suggests(e: Env) -> None:
    cfg = e.base_yaml("batchsize: 8\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]),
                 [str(cfg), "unknown key 'batchsize'", "did you mean 'batch_size'"])


def case_wrong_type_names_file_line_and_key(e: Env) -> None:
    cfg = e.yaml(f"preset: tiny\ndata: {e.corpus}\nseq_len: sixteen\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [f"{cfg}:3", "seq_len", "integer"])
    cfg = e.yaml(f"preset: tiny\ndata: {e.corpus}\nlr: [0.1, 0.2]\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [f"{cfg}:3", "lr"])
    cfg = e.yaml(f"preset: tiny\ndata: {e.corpus}\npack: maybe\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [f"{cfg}:3", "pack", "true or false"])


def case_bad_values_and_files(e: Env) -> None:
    cfg = e.yaml(f"preset: tiny\ndata: {e.root / 'missing.txt'}\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [f"{cfg}:2", "data"])
    cfg = e.yaml("preset: tiny\n  data: : x\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [str(cfg)])
    cfg = e.yaml("- preset\n- tiny\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [str(cfg), "mapping"])
    cfg = e.yaml(f"preset: tiny\ndata: {e.corpus}\nsteps: 2\nsteps: 3\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [f"{cfg}:4", "steps"])
    cfg = e.yaml(f"preset: tiny\nmodel: {e.root}\ndata: {e.corpus}\n")
    expect_error(e.run(["train", "-c", cfg, "--out", e.path("out")]), [str(cfg), "exclude"])
    missing = e.root / "no-such.yaml"
    expect_error(e.run(["train", "-c", missing, "--out", e.path("out")]), [str(missing)])


def case_resume_from_the_file(e: Env) -> None:
    out = e.path("out")
    expect_ok(e.run(["train", "-c", e.base_yaml("save_every: 2\n"), "--out", out]))
    check((out / "checkpoints" / "latest").read_text().strip() == "step-000002", "no checkpoint at step 2")
    p = e.run(["train", "-c", e.base_yaml("save_every: 2\nresume: true\n"), "--out", out, "--steps", "4"])
    expect_ok(p)
    check("resumed from" in p.stdout and "step 2" in p.stdout, f"no resume line:\n{p.stdout}")
    check([m["step"] for m in metrics_steps(out)] == [1, 2, 3, 4], "metrics.jsonl does not hold steps 1-4 once")
    check((out / "checkpoints" / "latest").read_text().strip() == "step-000004", "no checkpoint at step 4")


def main() -> int:
    return cli_helpers.main_of_cases(globals(), "flotilla_config_file_test_", Env)


if __name__ == "__main__":
    sys.exit(main())
