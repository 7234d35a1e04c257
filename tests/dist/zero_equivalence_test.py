#!/usr/bin/env python3
"""ZeRO on N ranks = one unsharded rank with the same global batch (issue 12, item 3).

For --zero 1, 2 and 3, on 1, 2, 3 and 4 ranks (and with 20 KiB buckets: many units) (micro-batch 12/N, so the global batch is
the same 12 rows), 20 steps of full training of the tiny preset with --grad-accum 2 and
gradient clipping at work: every step's loss within 1e-5 relative and every final weight
within 1e-5 of its tensor's largest value, against `flotilla train` alone without --zero.
The flat arena of the tiny model is not divisible by 3 or 4, so the shards' tail is covered.
Then:
  - --zero 3 in its test mode (weights not gathered read NaN), and on a Qwen2-shaped model
    with tied embeddings and q/k/v biases under --grad-checkpoint at 2 and 3 ranks against
    --zero 2 on as many ranks;
  - --zero 3 with --dtype bf16 (test mode): one step on 2 and 3 ranks against one bf16 rank
    (1e-5), 20 steps against --zero 2 in bf16 on 3 ranks, tied and checkpointing on 2, LoRA
    (3 ranks) and LoRA over a 4-bit base (2 ranks) against plain data parallelism (1e-6);
  - LoRA adapters (rank 4) with --zero 2 and with --zero 3 (the base sharded; test mode,
    --grad-checkpoint) on 3 ranks against one rank; over a 4-bit base with --zero 3 (its
    packed weights sharded; test mode) on 2 and 3 ranks against one rank; adapters on the last block only with
    --zero 3 on 2 ranks: bit for bit plain data parallelism's;
  - a checkpoint written at step 10 by 4 ranks with --zero 2 resumed on 3 ranks with --zero 1
    and on 1 rank without sharding, and one by 4 ranks with --zero 3 resumed at 3 ranks
    ZeRO-2, 2 ranks ZeRO-3 and 1 rank: the resumed losses and final weights against the
    uninterrupted 1-rank run (each rank wrote its own shard: sharded_checkpoint_test.py);
  - --zero 2 sends the bytes of one all-reduce per step (reduce-scatter + all-gather), as
    the run report counts them;
  - --zero 2 with --compression bf16 and fp16 on 3 ranks: the shards' reduce-scatter in
    halves, losses within 2e-5 of the float32 run (weights 5e-2: see there), 2/3 of its bytes;
  - bad combinations are refused with one line: --zero 4, --zero 3 training a 4-bit base (not LoRA),
    with --compression,
    --zero with --sync-every, with --compression topk, --compression-warmup with --zero.
Usage: zero_equivalence_test.py FLOTILLA [--mpirun MPIRUN]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import mpi_env, mpirun_argv, run, script_args, summary  # noqa: E402  (next to this file)
from train_equivalence_test import losses, read_safetensors  # noqa: E402

import numpy as np  # Debian's python3-numpy  # noqa: E402

SOURCE = os.path.dirname(os.path.dirname(HERE))
GLOBAL_BATCH = 12
TOLERANCE = 1e-5  # the data-parallel equivalence tolerance (issue 12); float rounding of sums in another order


def compare(name, base_dir, other_dir, weights_file="model.safetensors", from_step=0, tolerance=TOLERANCE,
            weight_tolerance=None):
    weight_tolerance = tolerance if weight_tolerance is None else weight_tolerance
    failures = []
    base_train, base_valid = losses(base_dir, from_step)
    other_train, other_valid = losses(other_dir, from_step)
    if len(base_train) != len(other_train) or not base_train:
        failures.append(f"{name}: {len(base_train)} vs {len(other_train)} steps")
    worst_loss = 0.0
    for step, (a, b) in enumerate(zip(base_train + base_valid, other_train + other_valid)):
        err = abs(a - b) / max(abs(a), 1e-12)
        worst_loss = max(worst_loss, err)
        if err > tolerance:
            failures.append(f"{name}: loss #{step + 1} {a!r} unsharded vs {b!r}, rel {err:.2e}")
    wa = read_safetensors(os.path.join(base_dir, weights_file))
    wb = read_safetensors(os.path.join(other_dir, weights_file))
    worst_w = 0.0
    for t in wa:
        err = float(np.abs(wa[t] - wb[t]).max()) / max(float(np.abs(wa[t]).max()), 1e-12)
        worst_w = max(worst_w, err)
        if err > weight_tolerance:
            failures.append(f"{name}: weight {t} differs by {err:.2e} relative")
    print(f"{name:<40} max loss rel err {worst_loss:.2e}, max weight rel err {worst_w:.2e}")
    return failures


def report(run_dir):
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def main():
    args = script_args()
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun)
    tmp = tempfile.mkdtemp(prefix="flotilla_zero_")
    failures = []
    f = args.flotilla
    try:
        model = os.path.join(tmp, "model")
        run([f, "init", "--preset", "tiny", "--out", model, "--seed", "5"], env)
        data = ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")]
        # --grad-clip 0.5: the tiny model's norm is above it for most steps, so the global
        # norm over the shards decides the update. At --lr 1e-3 plain data parallelism ends
        # 5e-6 to 8e-6 from one rank here (a micro-batch of 12/N rows sums in another order);
        # at 3e-3 it drifts past 1e-5 after 20 steps, with or without sharding.
        common = data + ["--steps", "20", "--seq-len", "64", "--lr", "1e-3", "--warmup", "2", "--eval-every", "10",
                         "--eval-batches", "2", "--seed", "11", "--grad-accum", "2", "--log-every", "1",
                         "--grad-clip", "0.5"]

        def train(out, ranks, extra):
            cmd = [f, "train", "--model", model, "--out", out, "--batch-size", str(GLOBAL_BATCH // ranks)] + common + extra
            return run((mpirun + ["-np", str(ranks)] if ranks > 1 else []) + cmd, env)

        base = os.path.join(tmp, "base")
        train(base, 1, [])
        for stage in (1, 2):
            for ranks in (1, 2, 3, 4):
                out = os.path.join(tmp, f"zero{stage}_{ranks}")
                train(out, ranks, ["--zero", str(stage)])
                failures += compare(f"--zero {stage}, {ranks} ranks", base, out)
                if ranks > 1:
                    r = report(out)
                    if r.get("gradient_sync") != f"ZeRO-{stage}":
                        failures.append(f"--zero {stage}: the report names the sync {r.get('gradient_sync')!r}")
                    # A reduce-scatter per exchange and one all-gather, (N-1)/N of the arena's bytes
                    # each: stage 1 exchanges once a step (= one all-reduce), stage 2 after each of
                    # the --grad-accum 2 micro-batches.
                    params = sum(t.size for t in read_safetensors(os.path.join(out, "model.safetensors")).values())
                    expected = (1 + (2 if stage == 2 else 1)) * (ranks - 1) / ranks * 4 * params
                    got = r["gradient_bytes_per_step"]
                    if abs(got - expected) > 0.01 * expected:
                        failures.append(f"--zero {stage}, {ranks} ranks: {got:.0f} bytes a step, expected {expected:.0f}")

        # ZeRO-3: the weights sharded too, each group gathered before use. In the test mode
        # (FLOTILLA_ZERO_POISON=1) a rank's released weights read NaN, so a read of a weight
        # that was not gathered would show in the losses and the weights.
        poison = dict(env, FLOTILLA_ZERO_POISON="1")

        def train3(out, ranks, extra, model_dir=model):
            cmd = [f, "train", "--model", model_dir, "--out", out, "--batch-size", str(GLOBAL_BATCH // ranks)] + common + extra
            return run((mpirun + ["-np", str(ranks)] if ranks > 1 else []) + cmd, poison)

        for ranks in (1, 2, 3, 4):
            out = os.path.join(tmp, f"zero3_{ranks}")
            train3(out, ranks, ["--zero", "3"])
            failures += compare(f"--zero 3, {ranks} ranks", base, out)
            if ranks > 1 and report(out).get("gradient_sync") != "ZeRO-3":
                failures.append(f"--zero 3: the report names the sync {report(out).get('gradient_sync')!r}")

        # A Qwen2-shaped model with tied embeddings (the head reads the embedding's weight)
        # and q/k/v biases, 3 blocks of an FFN width of 200, under gradient checkpointing
        # (each block recomputed inside its backward, on the weights gathered for it).
        with open(os.path.join(model, "config.json")) as cf:
            cfg = json.load(cf)
        cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True,
                   intermediate_size=200, num_hidden_layers=3)
        with open(os.path.join(tmp, "tied.json"), "w") as cf:
            json.dump(cfg, cf)
        tied = os.path.join(tmp, "tied")
        run([f, "init", "--config", os.path.join(tmp, "tied.json"), "--out", tied, "--seed", "5"], env)
        # The reference is ZeRO-2 on as many ranks (the stage the loop above holds to one rank):
        # on this model plain data parallelism itself ends 1.3e-5 to 2e-5 from one rank after
        # 20 steps, in the k_proj biases, whose true gradient is zero (a bias added to every
        # key shifts a query's scores alike, which softmax ignores): their update is rounding
        # noise that AdamW scales up to the step size.
        for ranks in (2, 3):
            ref = os.path.join(tmp, f"tied_zero2_{ranks}")
            train3(ref, ranks, ["--zero", "2", "--grad-checkpoint"], tied)
            out = os.path.join(tmp, f"tied_zero3_{ranks}")
            train3(out, ranks, ["--zero", "3", "--grad-checkpoint"], tied)
            failures += compare(f"--zero 3 vs 2, tied, checkpointing, {ranks} ranks", ref, out)

        # --dtype bf16 under ZeRO-3 (issue 12 x 14): the model's bf16 copy is made tensor by
        # tensor when a product reads it, of the floats gathered for it, and dropped with
        # them at the release (test mode: poisoned with NaN), so a copy made while a group was
        # released, or kept past its release, reads NaN or stale weights. One step against one
        # rank in bf16 (measured 1.6e-6 at 2 ranks, 2.1e-6 at 3); after that bf16's rounding
        # of the weights magnifies the sums' order (ZeRO-2 and plain data parallelism end
        # 3.6e-4 from one rank after 20 steps), so the 20-step runs are compared with the
        # unsharded-weight run of the same gradients on as many ranks: ZeRO-2, whose whole
        # weights are converted whole, and for LoRA (adapters all-reduced whole) plain data
        # parallelism: the same bits measured (0.0); 1e-6 allows for sums reordered later.
        bf16 = ["--dtype", "bf16"]
        one_step = common[:common.index("--steps")] + ["--steps", "1"] + common[common.index("--steps") + 2:]
        for ranks in (1, 2, 3):
            out = os.path.join(tmp, f"bf16_zero3_step1_{ranks}")
            cmd = [f, "train", "--model", model, "--out", out, "--batch-size", str(GLOBAL_BATCH // ranks)] + one_step + bf16
            run((mpirun + ["-np", str(ranks)] if ranks > 1 else []) + cmd + (["--zero", "3"] if ranks > 1 else []), poison)
            if ranks > 1:
                failures += compare(f"bf16 --zero 3, 1 step, {ranks} ranks", os.path.join(tmp, "bf16_zero3_step1_1"), out)
        ref = os.path.join(tmp, "bf16_zero2_3")
        train3(ref, 3, bf16 + ["--zero", "2"])
        out = os.path.join(tmp, "bf16_zero3_3")
        train3(out, 3, bf16 + ["--zero", "3"])
        failures += compare("bf16 --zero 3 vs 2, 3 ranks", ref, out, tolerance=1e-6)
        ref = os.path.join(tmp, "bf16_tied_zero2_2")
        train3(ref, 2, bf16 + ["--zero", "2", "--grad-checkpoint"], tied)
        out = os.path.join(tmp, "bf16_tied_zero3_2")
        train3(out, 2, bf16 + ["--zero", "3", "--grad-checkpoint"], tied)
        failures += compare("bf16 --zero 3 vs 2, tied, checkpointing, 2 ranks", ref, out, tolerance=1e-6)

        # Small buckets: many units, each sharded on its own and reduce-scattered on the
        # communication thread while backward goes on.
        out = os.path.join(tmp, "zero2_buckets_3")
        train(out, 3, ["--zero", "2", "--bucket-mb", "0.02"])
        failures += compare("--zero 2, 3 ranks, 20 KiB buckets", base, out)
        out = os.path.join(tmp, "zero1_buckets_4")
        train(out, 4, ["--zero", "1", "--bucket-mb", "0.02"])
        failures += compare("--zero 1, 4 ranks, 20 KiB buckets", base, out)

        # LoRA: the trainable arena is the adapters'.
        lora = ["--fine-tune-type", "lora", "--lora-rank", "4"]
        lora_base = os.path.join(tmp, "lora_base")
        train(lora_base, 1, lora)
        lora_zero = os.path.join(tmp, "lora_zero2_3")
        train(lora_zero, 3, lora + ["--zero", "2"])
        failures += compare("LoRA, --zero 2, 3 ranks", lora_base, lora_zero, "adapter_model.safetensors")
        # --zero 3 with LoRA: the frozen base sharded and gathered on use (test mode: a base
        # weight read without its gather is NaN), the adapters whole and all-reduced. Under
        # --grad-checkpoint each block is recomputed on the base weights gathered for its
        # backward.
        lora_zero3 = os.path.join(tmp, "lora_zero3_3")
        train3(lora_zero3, 3, lora + ["--zero", "3", "--grad-checkpoint"])
        failures += compare("LoRA, --zero 3, checkpointing, 3 ranks", lora_base, lora_zero3, "adapter_model.safetensors")
        r = report(lora_zero3)
        if r.get("gradient_sync") != "ZeRO-3, frozen base, adapters all-reduced":
            failures.append(f"LoRA --zero 3: the report names the sync {r.get('gradient_sync')!r}")
        # Adapters on the last block only: backward stops there, and the block below is
        # neither gathered for backward nor read. The adapters' sums are plain data
        # parallelism's: the same bits as its 2 ranks (which differ from one rank by up to
        # 3e-5 here, in lora_B tensors that start at zero).
        last = lora + ["--num-layers", "1"]
        lora_dp = os.path.join(tmp, "lora_last_dp_2")
        train(lora_dp, 2, last + ["--bucket-mb", "0"])
        lora_last3 = os.path.join(tmp, "lora_last_zero3_2")
        train3(lora_last3, 2, last + ["--zero", "3"])
        failures += compare("LoRA last block, --zero 3 vs plain, 2 ranks", lora_dp, lora_last3,
                            "adapter_model.safetensors", tolerance=0.0)

        # bf16 with LoRA under ZeRO-3: the frozen base's bf16 copy too is made per gathered
        # group and dropped at its release (kept whole otherwise: a frozen base's copy never
        # goes stale on one rank); against plain data parallelism on as many ranks (the
        # adapters' sums are its).
        ref = os.path.join(tmp, "bf16_lora_dp_3")
        train3(ref, 3, bf16 + lora + ["--grad-checkpoint"])
        out = os.path.join(tmp, "bf16_lora_zero3_3")
        train3(out, 3, bf16 + lora + ["--zero", "3", "--grad-checkpoint"])
        failures += compare("bf16 LoRA, --zero 3 vs plain, checkpointing, 3 ranks", ref, out,
                            "adapter_model.safetensors", tolerance=1e-6)

        # --zero 3 with LoRA over a 4-bit base: each group's packed weights, scales and biases
        # sharded in the packed arena and gathered on use (test mode: a packed word read
        # without its gather is NaN, so is the loss), on 2 and 3 ranks against one rank.
        q4 = os.path.join(tmp, "q4")
        run([f, "init", "--preset", "tiny", "--out", q4, "--seed", "5", "--quantize", "4", "--group-size", "32"], env)
        q4_base = os.path.join(tmp, "lora_q4_base")
        train3(q4_base, 1, lora, q4)
        for ranks in (2, 3):
            out = os.path.join(tmp, f"lora_q4_zero3_{ranks}")
            train3(out, ranks, lora + ["--zero", "3"], q4)
            failures += compare(f"LoRA, 4-bit base, --zero 3, {ranks} ranks", q4_base, out, "adapter_model.safetensors")
        # The same in bf16: the 4-bit tiles are dequantized into bf16 from the gathered packed
        # words; the float tensors (norms, an unquantized head) take the bf16 copy above.
        ref = os.path.join(tmp, "bf16_lora_q4_dp_2")
        train3(ref, 2, bf16 + lora, q4)
        out = os.path.join(tmp, "bf16_lora_q4_zero3_2")
        train3(out, 2, bf16 + lora + ["--zero", "3"], q4)
        failures += compare("bf16 LoRA, 4-bit base, --zero 3 vs plain, 2 ranks", ref, out, "adapter_model.safetensors",
                            tolerance=1e-6)

        # --compression bf16 / fp16: the gradient shards travel in halves, each rank's values
        # rounded once (bf16 2^-9 relative, fp16 after its range scale 2^-12) and summed in
        # float32, with no error feedback. The losses stay within 2e-5 relative of the float32
        # run (measured 1.1e-6 bf16, 1.6e-6 fp16; plain data parallelism's compression 2.6e-6
        # and 4.7e-7); a lost or doubled rank's gradient moves them far more. Single weights
        # move more: where a gradient is near zero, rounding can flip its sign, and AdamW's
        # normalisation makes that a full +-lr step: up to 1.4e-2 of a tensor's largest weight
        # after 20 steps at lr 1e-3 (measured, and the same for plain data parallelism's
        # --compression bf16 with its error feedback), so 5e-2 bounds them. The
        # reduce-scatter sends half the bytes; the weights' all-gather stays float32.
        for kind in ("bf16", "fp16"):
            out = os.path.join(tmp, f"zero2_{kind}_3")
            train(out, 3, ["--zero", "2", "--compression", kind])
            failures += compare(f"--zero 2 --compression {kind}, 3 ranks", base, out, tolerance=2e-5,
                                weight_tolerance=5e-2)
            r = report(out)
            params = sum(t.size for t in read_safetensors(os.path.join(out, "model.safetensors")).values())
            full = (1 + 2) * 2 / 3 * 4 * params  # two float reduce-scatters and an all-gather a step
            ratio = r["gradient_bytes_per_step"] / full
            print(f"--zero 2 --compression {kind}: {r['gradient_sync']!r}, bytes {ratio:.3f} of float32's")
            if r.get("gradient_sync") != f"ZeRO-2, gradient shards in {kind}" or not 0.65 <= ratio <= 0.70:
                failures.append(f"--zero 2 --compression {kind}: sync {r.get('gradient_sync')!r}, {ratio:.3f} of the "
                                f"float32 bytes (expected 2/3: halves in the two reduce-scatters, floats in the "
                                f"all-gather)")

        # A checkpoint of 4 ZeRO-2 ranks resumed elsewhere.
        writer = os.path.join(tmp, "writer")
        train(writer, 4, ["--zero", "2", "--save-every", "10"])
        step10 = os.path.join(writer, "checkpoints", "step-000010")
        for ranks, extra, name in ((3, ["--zero", "1"], "4 ranks ZeRO-2 -> 3 ranks ZeRO-1"),
                                   (1, [], "4 ranks ZeRO-2 -> 1 rank unsharded")):
            out = os.path.join(tmp, f"resumed_{ranks}")
            log = train(out, ranks, extra + ["--resume", step10])
            if "resumed from" not in log:
                failures.append(f"{name}: the run did not say it resumed:\n{log}")
            failures += compare(name, base, out, from_step=10)

        # A checkpoint of 4 ZeRO-3 ranks (each wrote the shard it holds) resumed at 3 ranks
        # ZeRO-2 and at 1 rank unsharded (issue 12, item 6).
        writer3 = os.path.join(tmp, "writer3")
        train3(writer3, 4, ["--zero", "3", "--save-every", "10"])
        step10 = os.path.join(writer3, "checkpoints", "step-000010")
        for ranks, extra, name in ((3, ["--zero", "2"], "4 ranks ZeRO-3 -> 3 ranks ZeRO-2"),
                                   (1, [], "4 ranks ZeRO-3 -> 1 rank unsharded"),
                                   (2, ["--zero", "3"], "4 ranks ZeRO-3 -> 2 ranks ZeRO-3")):
            out = os.path.join(tmp, f"resumed3_{ranks}")
            log = train3(out, ranks, extra + ["--resume", step10])
            if "resumed from" not in log:
                failures.append(f"{name}: the run did not say it resumed:\n{log}")
            failures += compare(name, base, out, from_step=10)

        # Ranks started with different sync flags stop at once, naming the setting.
        mpmd = mpirun + ["-np", "1", f, "train", "--model", model, "--out", os.path.join(tmp, "mixed"), "--batch-size", "2",
                         "--zero", "1"] + common + [":", "-np", "1", f, "train", "--model", model, "--out",
                                                    os.path.join(tmp, "mixed"), "--batch-size", "2"] + common
        proc = subprocess.run(mpmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        if proc.returncode == 0 or "ranks see different gradient sync settings" not in proc.stderr:
            failures.append(f"ranks with --zero 1 and without: exit {proc.returncode}, {proc.stderr.strip()[-300:]!r}")
        else:
            print("refused: one rank --zero 1, one without")

        # Refused up front, one line each.
        refusals = [(["--zero", "4"], "--zero must be"),
                    (["--zero", "3", "--sync-every", "4"], "--sync-every"),
                    (["--zero", "3", "--compression", "bf16"], "--zero 3 cannot be combined with --compression"),
                    (["--zero", "1", "--sync-every", "4"], "--sync-every"),
                    (["--zero", "2", "--compression", "topk"], "--compression topk"),
                    (["--zero", "2", "--compression", "bf16", "--compression-warmup", "5"], "--compression-warmup")]
        # Stage 3 trains no 4-bit base (LoRA over it is the case above).
        refusals.append((["--model", q4, "--zero", "3"], "cannot be fully fine-tuned"))
        for extra, why in refusals:
            model_flag = [] if "--model" in extra else ["--model", model]
            proc = subprocess.run(mpirun + ["-np", "2", f, "train"] + model_flag + ["--out", os.path.join(tmp, "bad"),
                                            "--batch-size", "2"] + common + extra,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
            lines = [line for line in proc.stderr.splitlines() if line.startswith("flotilla: error:")]
            if proc.returncode != 2 or not lines or why not in lines[0]:
                failures.append(f"{' '.join(extra)}: exit {proc.returncode}, stderr {proc.stderr.strip()[-300:]!r}")
            else:
                print(f"refused: {' '.join(extra):<32} {lines[0]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures)


if __name__ == "__main__":
    sys.exit(main())
