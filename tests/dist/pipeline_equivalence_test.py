#!/usr/bin/env python3
"""Pipeline parallelism = one rank with the same global batch (issue 15, item 2).

A 4-layer model (vocabulary 512, width 64, tied embeddings) trains 20 steps on the sample
corpus, a global batch of 16 rows a step (--grad-accum 2), gradient clipping at work.
Against `flotilla train` alone on the same global batch in micro-batches of the same 2 rows
(--batch-size 2 --grad-accum 8), every step's loss and validation loss within 1e-5
relative and every final weight within 1e-5 of its tensor's largest value, for:
  - pp=2 and pp=4, each schedule (gpipe, 1f1b), 4 micro-batches per batch of 8 rows;
  - dp=2,pp=2 (each replica's batch of 4 rows in 2 micro-batches), 1f1b, with --zero 1
    (each stage's moments sharded over its dp group of 2, the update all-gathered there;
    the clipping norm summed over dp, then over the stages);
  - pp=2 with --pp-layers 3,1 (uneven stages);
  - LoRA (rank 4) on pp=2 and on dp=2,pp=2;
  - LoRA on a 4-bit base (init --quantize 4) on pp=2;
  - checkpoints at step 10 resumed on another layout (each stage of the first replica writes
    its own tensors, under ZeRO-1 each replica its shard of them; a rank reads what it
    holds): pp=2 -> 1 rank, dp=2,pp=2 ZeRO-1 -> pp=2, one rank's -> dp=2,pp=2 ZeRO-1, and
    LoRA pp=2 -> 1 rank; the resumed losses and final weights
    against the one-rank run.
Why the same rows per micro-batch: against one rank in micro-batches of 8 rows every
pipeline run here ends 1.06e-5 to 1.27e-5 from it in one tensor (layers.0 down_proj), the
same for pp=2 and pp=4 and either schedule: the weight gradients summed over rows grouped
otherwise round otherwise, and AdamW's division by sqrt(v) magnifies that where gradients
are small. That is the micro-batch split, not the pipeline (which adds the same
micro-batch gradients in the same order as one rank accumulating them).
The run's log names the stages; stage 0 holds at most P micro-batches' activations under
1F1B and all 8 of a flush under GPipe (the run report's count of its activation slots), and
report.json counts the activation bytes it sends a step (16 rows x 64 tokens x 64 floats).
Usage: pipeline_equivalence_test.py FLOTILLA [--mpirun MPIRUN]
"""
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import init_model, mpi_env, mpirun_argv, run, script_args, summary  # noqa: E402
from zero_equivalence_test import compare  # noqa: E402  (losses and weights, 1e-5 relative)

SOURCE = os.path.dirname(os.path.dirname(HERE))
GLOBAL_BATCH = 8

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "initializer_range": 0.02,
}


def main():
    args = script_args()
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun)
    tmp = tempfile.mkdtemp(prefix="flotilla_pipeline_")
    failures = []
    cases = 0
    f = args.flotilla
    try:
        config, model = init_model(f, CONFIG, tmp, env)
        data = ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")]
        # As zero_equivalence_test: --lr 1e-3 keeps float rounding of sums in another order
        # (micro-batches of fewer rows) below 1e-5 after 20 steps; --grad-clip 0.5 makes the
        # global norm across the stages decide every update.
        common = data + ["--steps", "20", "--seq-len", "64", "--lr", "1e-3", "--warmup", "2", "--eval-every", "10",
                         "--seed", "11", "--log-every", "1", "--grad-clip", "0.5"]

        def train(out, dp, pp, extra, base_model=model):
            ranks = dp * pp
            # One rank: the global batch in micro-batches of 2 rows.
            # Validation: the same 16 rows (2 batches of 8, or 8 of 2).
            shape = ["--batch-size", str(GLOBAL_BATCH // dp), "--grad-accum", "2", "--eval-batches", "2"] \
                if ranks > 1 else ["--batch-size", "2", "--grad-accum", str(GLOBAL_BATCH), "--eval-batches", "8"]
            cmd = [f, "train", "--model", base_model, "--out", out] + shape + common + extra
            if ranks > 1:
                cmd += ["--parallel", f"dp={dp},pp={pp}"]
            return run((mpirun + ["-np", str(ranks)] if ranks > 1 else []) + cmd, env)

        base = os.path.join(tmp, "base")
        train(base, 1, 1, ["--save-every", "10"])
        for pp in (2, 4):
            for schedule in ("gpipe", "1f1b"):
                out = os.path.join(tmp, f"pp{pp}_{schedule}")
                ckpt = ["--save-every", "10"] if (pp, schedule) == (2, "1f1b") else []
                log = train(out, 1, pp, ["--micro-batches", "4", "--pp-schedule", schedule] + ckpt)
                if f"pipeline: {pp} stages" not in log:
                    failures.append(f"pp={pp} {schedule}: the log does not name the stages:\n{log}")
                failures += compare(f"pp={pp}, {schedule}, M=4", base, out)
                # Activations held at once on stage 0 (the run report counts its slots): a
                # flush of 2 x 4 micro-batches; 1F1B holds at most P of them, GPipe all.
                with open(os.path.join(out, "report.json")) as r:
                    report = json.load(r)
                slots = report["pipeline"]["stage0_activation_slots"]
                # Stage 0 sends each micro-batch's activations (and gets their gradients):
                # 2 x 8 rows of 64 tokens x 64 floats a step, 262144 bytes, counted.
                if report["pipeline"]["p2p_bytes_per_step"] != 262144 or report["bytes_sent_per_step"] != 262144:
                    failures.append(f"pp={pp} {schedule}: stage 0 sent {report['pipeline']['p2p_bytes_per_step']} "
                                    f"bytes a step ({report['bytes_sent_per_step']} in all), not 262144")
                if slots != (8 if schedule == "gpipe" else pp):
                    failures.append(f"pp={pp} {schedule}: stage 0 held {slots} micro-batches' activations")
                print(f"pp={pp}, {schedule}: stage 0 held at most {slots} micro-batches' activations")
                cases += 1
        out = os.path.join(tmp, "dp2_pp2")
        train(out, 2, 2, ["--micro-batches", "2", "--save-every", "10", "--zero", "1"])
        with open(os.path.join(out, "report.json")) as r:
            sync = json.load(r).get("gradient_sync")
        if sync != "pipeline + ZeRO-1":
            failures.append(f"dp=2,pp=2 --zero 1: report.json's gradient sync is {sync!r}, not 'pipeline + ZeRO-1'")
        failures += compare("dp=2,pp=2, 1f1b, M=2, ZeRO-1", base, out)
        out = os.path.join(tmp, "pp2_uneven")
        log = train(out, 1, 2, ["--micro-batches", "4", "--pp-layers", "3,1"])
        if "[0, 3) [3, 4)" not in log:
            failures.append(f"--pp-layers 3,1: the log does not show the stages:\n{log}")
        failures += compare("pp=2, --pp-layers 3,1", base, out)
        cases += 2

        # Checkpoints across layouts (issue 15 item 4).
        def step10(run_dir):
            return ["--resume", os.path.join(tmp, run_dir, "checkpoints", "step-000010")]

        for name, (dp, pp), extra in (("pp=2 checkpoint -> 1 rank", (1, 1), step10("pp2_1f1b")),
                                      ("dp=2,pp=2 checkpoint -> pp=2", (1, 2),
                                       ["--micro-batches", "4"] + step10("dp2_pp2")),
                                      ("1-rank checkpoint -> dp=2,pp=2", (2, 2),
                                       ["--micro-batches", "2", "--zero", "1"] + step10("base"))):
            out = os.path.join(tmp, "resumed_" + name.split()[0].replace("=", "").replace(",", "_"))
            log = train(out, dp, pp, extra)
            if "resumed from" not in log:
                failures.append(f"{name}: the run did not say it resumed:\n{log}")
            failures += compare(name, base, out, from_step=10)
            cases += 1

        lora = ["--fine-tune-type", "lora", "--lora-rank", "4", "--lora-targets", "q,v,down"]
        lora_base = os.path.join(tmp, "lora_base")
        train(lora_base, 1, 1, lora)
        for dp, pp in ((1, 2), (2, 2)):
            out = os.path.join(tmp, f"lora_dp{dp}_pp{pp}")
            ckpt = ["--save-every", "10"] if dp == 1 else []
            train(out, dp, pp, lora + ["--micro-batches", str(4 // dp)] + ckpt)
            failures += compare(f"LoRA, dp={dp},pp={pp}", lora_base, out, "adapter_model.safetensors")
            cases += 1
        # A LoRA pp=2 checkpoint (its step folder's PEFT files whole) resumed on one rank.
        out = os.path.join(tmp, "lora_resumed_1")
        log = train(out, 1, 1, lora + step10("lora_dp1_pp2"))
        if "resumed from" not in log:
            failures.append(f"LoRA pp=2 checkpoint -> 1 rank: the run did not say it resumed:\n{log}")
        failures += compare("LoRA pp=2 checkpoint -> 1 rank", lora_base, out, "adapter_model.safetensors",
                            from_step=10)
        cases += 1

        q4 = os.path.join(tmp, "model_q4")
        run([f, "init", "--config", config, "--out", q4, "--seed", "5", "--quantize", "4", "--group-size", "32"], env)
        q4_base = os.path.join(tmp, "q4_base")
        train(q4_base, 1, 1, lora, q4)
        out = os.path.join(tmp, "q4_pp2")
        train(out, 1, 2, lora + ["--micro-batches", "4", "--pp-schedule", "gpipe"], q4)
        failures += compare("LoRA on a 4-bit base, pp=2", q4_base, out, "adapter_model.safetensors")
        cases += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures, cases)


if __name__ == "__main__":
    sys.exit(main())
