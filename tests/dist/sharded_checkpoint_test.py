#!/usr/bin/env python3
"""Sharded checkpoints that reshard (issue 12, item 6; docs/sharded-checkpoints.md).

The run to match: 20 steps of the tiny preset on one rank, global batch 12 (the settings
of zero_equivalence_test.py). Then:
  - 4 ranks with --zero 2 and 20 KiB buckets (many units, so many tails, all rank 0's)
    save at step 10: each rank writes its own rank-NNNNN.safetensors of about 3P/4 floats
    (weights, m, v of its shard), the ranges in layout.json tile the arena once per kind;
  - that checkpoint resumed on 3 ranks with --zero 1 and on 1 rank without sharding: every
    later loss and the final weights within 1e-5 of the uninterrupted run;
  - 2 ranks of plain data parallelism (the arena cut in 2 equal parts) resumed on 4 ranks
    with --zero 2;
  - a checkpoint in the format written before sharding (weights.safetensors and
    optimizer.safetensors, rebuilt here from the rank files) still resumes, on 3 ranks with
    --zero 1;
  - a damaged checkpoint (a rank file missing; a range written twice, with the manifest
    rewritten to match) is refused with one error line naming it, exit 2;
  - local SGD with DiLoCo's outer momentum on 2 ranks: stop at step 4 + resume on 2 ranks =
    the uninterrupted run bit for bit (each rank's moments and outer momentum restored from
    its state file); resumed on 1 rank, one warning line; the same exactness for top-k and
    PowerSGD (bf16, warm-up) compression, whose residuals and warm start are restored;
  - 4 ranks with --zero 3 (its test mode: released weights read NaN) write about 3P/4
    floats each, no NaN; their last checkpoint consolidates to the final model they wrote
    group by group; the step-10 one resumes on 3 ranks with --zero 2;
  - flotilla convert --checkpoint: the consolidated model equals the trained model at that
    step (the 4-rank writer's step-20 folder against its model.safetensors, tensors and
    flotilla score), a non-empty --out is refused; a LoRA run's (3 ranks, ZeRO-2) gives the
    run's PEFT adapter.
Usage: sharded_checkpoint_test.py FLOTILLA [--mpirun MPIRUN]
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import mpi_env, mpirun_argv, run, script_args, summary  # noqa: E402  (next to this file)
from train_equivalence_test import read_safetensors  # noqa: E402
from zero_equivalence_test import compare  # noqa: E402

import numpy as np  # Debian's python3-numpy  # noqa: E402

SOURCE = os.path.dirname(os.path.dirname(HERE))
GLOBAL_BATCH = 12


def crc32c(data):
    """CRC-32C (Castagnoli), as the store's manifest records it."""
    table = crc32c.table
    if table is None:
        table = crc32c.table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
    c = 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


crc32c.table = None


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, array in tensors:
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def rewrite_manifest(step_dir):
    """The manifest of every file in step_dir, as a writer would have made it."""
    path = os.path.join(step_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["files"] = {}
    for name in sorted(os.listdir(step_dir)):
        if name == "manifest.json":
            continue
        with open(os.path.join(step_dir, name), "rb") as f:
            data = f.read()
        manifest["files"][name] = {"bytes": len(data), "crc32c": f"{crc32c(data):08x}"}
    with open(path, "w") as f:
        json.dump(manifest, f)


def read_layout(step_dir):
    with open(os.path.join(step_dir, "layout.json")) as f:
        return json.load(f)


def whole_arena(step_dir, layout, kind):
    arena = np.full(layout["arena_floats"], np.nan, dtype=np.float32)
    for name, kinds in layout["files"].items():
        data = read_safetensors(os.path.join(step_dir, name))[kind]
        at = 0
        for b, e in kinds[kind]:
            arena[b:e] = data[at:at + e - b]
            at += e - b
    return arena


def to_unsharded(step_dir, out_dir):
    """The same checkpoint in the format written before sharded checkpoints."""
    shutil.copytree(step_dir, out_dir)
    layout = read_layout(step_dir)
    arenas = {kind: whole_arena(step_dir, layout, kind) for kind in ("weights", "m", "v")}
    table = layout["table"]

    def tensors(kind, prefix=""):
        return [(prefix + p["name"], arenas[kind][p["offset"]:p["offset"] + p["numel"]].reshape(p["shape"]))
                for p in table]

    write_safetensors(os.path.join(out_dir, "weights.safetensors"), tensors("weights"))
    write_safetensors(os.path.join(out_dir, "optimizer.safetensors"), tensors("m", "m.") + tensors("v", "v."))
    for name in os.listdir(out_dir):
        if name.startswith("rank-") or name == "layout.json":
            os.remove(os.path.join(out_dir, name))
    rewrite_manifest(out_dir)


def expect_refused(failures, name, cmd, env, needle):
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flotilla: error:")]
    if proc.returncode != 2 or len(lines) != 1 or needle not in lines[0]:
        failures.append(f"{name}: exit {proc.returncode}, error lines {lines}, stderr {proc.stderr.strip()[-400:]!r}")
    else:
        print(f"refused: {name:<34} {lines[0]}")


def main():
    args = script_args()
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun)
    tmp = tempfile.mkdtemp(prefix="flotilla_sharded_")
    failures = []
    f = args.flotilla
    try:
        model = os.path.join(tmp, "model")
        run([f, "init", "--preset", "tiny", "--out", model, "--seed", "5"], env)
        data = ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")]
        common = data + ["--steps", "20", "--seq-len", "64", "--lr", "1e-3", "--warmup", "2", "--eval-every", "10",
                         "--eval-batches", "2", "--seed", "11", "--grad-accum", "2", "--log-every", "1",
                         "--grad-clip", "0.5"]

        def train(out, ranks, extra, **kw):
            flags = common
            if "--steps" in extra:  # this case's own run length
                flags = [a for i, a in enumerate(common) if a != "--steps" and (i == 0 or common[i - 1] != "--steps")]
            cmd = [f, "train", "--model", model, "--out", out, "--batch-size", str(GLOBAL_BATCH // ranks)] + flags + extra
            return (mpirun + ["-np", str(ranks)] if ranks > 1 else []) + cmd if kw.get("argv") else \
                run((mpirun + ["-np", str(ranks)] if ranks > 1 else []) + cmd, env)

        base = os.path.join(tmp, "base")
        train(base, 1, [])

        # 4 ranks, ZeRO-2, many units: each rank writes its own shard.
        writer = os.path.join(tmp, "writer")
        train(writer, 4, ["--zero", "2", "--bucket-mb", "0.02", "--save-every", "10"])
        step10 = os.path.join(writer, "checkpoints", "step-000010")
        layout = read_layout(step10)
        arena = layout["arena_floats"]
        rank_files = sorted(n for n in os.listdir(step10) if n.startswith("rank-"))
        if rank_files != [f"rank-{r:05d}.safetensors" for r in range(4)] or sorted(layout["files"]) != rank_files:
            failures.append(f"4 ranks wrote {rank_files}, layout.json names {sorted(layout['files'])}")
        for name in rank_files:
            tensors = read_safetensors(os.path.join(step10, name))
            floats = sum(t.size for t in tensors.values())
            # 3P/N, plus (rank 0) the units' tails: fewer than N floats per unit and kind.
            if abs(floats - 3 * arena / 4) > 0.01 * 3 * arena / 4:
                failures.append(f"{name}: {floats} floats, expected about 3P/N = {3 * arena / 4:.0f}")
            print(f"{name}: {floats} floats (3P/N = {3 * arena / 4:.0f}), "
                  f"{os.path.getsize(os.path.join(step10, name))} bytes")
        for kind in ("weights", "m", "v"):
            if np.isnan(whole_arena(step10, layout, kind)).any():
                failures.append(f"the ranges of {kind} leave part of the arena unwritten")
        if any(os.path.exists(os.path.join(step10, n)) for n in ("weights.safetensors", "optimizer.safetensors")):
            failures.append("a sharded step folder also holds the unsharded files")

        # Resumed elsewhere: 3 ranks ZeRO-1, 1 rank unsharded.
        for ranks, extra, name in ((3, ["--zero", "1"], "4 ranks ZeRO-2 -> 3 ranks ZeRO-1"),
                                   (1, [], "4 ranks ZeRO-2 -> 1 rank unsharded")):
            out = os.path.join(tmp, f"resumed_{ranks}")
            log = train(out, ranks, extra + ["--resume", step10])
            if "resumed from" not in log:
                failures.append(f"{name}: the run did not say it resumed:\n{log}")
            failures += compare(name, base, out, from_step=10)

        # Plain data parallelism on 2 ranks (the arena cut in two) resumed on 4 ZeRO-2 ranks.
        plain = os.path.join(tmp, "plain2")
        train(plain, 2, ["--save-every", "10"])
        plain10 = os.path.join(plain, "checkpoints", "step-000010")
        halves = read_layout(plain10)["files"]
        if sorted(halves) != ["rank-00000.safetensors", "rank-00001.safetensors"] or \
                halves["rank-00000.safetensors"]["weights"] != [[0, arena // 2]]:
            failures.append(f"2 plain ranks wrote {json.dumps(halves)[:300]}")
        out = os.path.join(tmp, "plain2_to_zero4")
        train(out, 4, ["--zero", "2", "--resume", plain10])
        failures += compare("2 ranks plain -> 4 ranks ZeRO-2", base, out, from_step=10)

        # The format written before sharded checkpoints still resumes, here under ZeRO.
        old = os.path.join(tmp, "old", "step-000010")
        os.makedirs(os.path.dirname(old))
        to_unsharded(step10, old)
        out = os.path.join(tmp, "old_to_zero3")
        log = train(out, 3, ["--zero", "1", "--resume", old])
        if "resumed from" not in log:
            failures.append(f"unsharded checkpoint: the run did not say it resumed:\n{log}")
        failures += compare("unsharded checkpoint -> 3 ranks ZeRO-1", base, out, from_step=10)

        # Damaged checkpoints: one line each, exit 2.
        missing = os.path.join(tmp, "missing", "step-000010")
        shutil.copytree(step10, missing)
        os.remove(os.path.join(missing, "rank-00002.safetensors"))
        expect_refused(failures, "a rank file missing", train(os.path.join(tmp, "r_missing"), 1, ["--resume", missing],
                                                              argv=True), env, "rank-00002.safetensors: missing")
        doubled = os.path.join(tmp, "doubled", "step-000010")
        shutil.copytree(step10, doubled)
        bad = read_layout(doubled)
        first = bad["files"]["rank-00001.safetensors"]["m"][0]
        bad["files"]["rank-00001.safetensors"]["m"][0] = [first[0] - 16, first[1] - 16]
        with open(os.path.join(doubled, "layout.json"), "w") as out_file:
            json.dump(bad, out_file)
        rewrite_manifest(doubled)
        expect_refused(failures, "a range written twice", train(os.path.join(tmp, "r_doubled"), 1, ["--resume", doubled],
                                                                argv=True), env, "written twice")

        # ZeRO-3 on 4 ranks, in its test mode (FLOTILLA_ZERO_POISON=1: a rank's released
        # weights read NaN): each rank writes about 3P/N floats, its own chunks, which is all
        # it holds (a NaN in a file would be a weight it did not hold); the checkpoint of step
        # 20 consolidates to the final model, which rank 0 wrote group by group as the ranks
        # gathered them; and the step-10 one resumes on 3 ranks with --zero 2.
        zero3 = os.path.join(tmp, "writer_zero3")
        poison = dict(env, FLOTILLA_ZERO_POISON="1")
        run(mpirun + ["-np", "4", f, "train", "--model", model, "--out", zero3, "--batch-size", str(GLOBAL_BATCH // 4)] +
            common + ["--zero", "3", "--save-every", "10"], poison)
        z3_step10 = os.path.join(zero3, "checkpoints", "step-000010")
        z3_layout = read_layout(z3_step10)
        for name in sorted(z3_layout["files"]):
            floats = sum(t.size for t in read_safetensors(os.path.join(z3_step10, name)).values())
            if abs(floats - 3 * arena / 4) > 0.01 * 3 * arena / 4:
                failures.append(f"--zero 3 {name}: {floats} floats, expected about 3P/N = {3 * arena / 4:.0f}")
        for kind in ("weights", "m", "v"):
            if np.isnan(whole_arena(z3_step10, z3_layout, kind)).any():
                failures.append(f"--zero 3: the checkpoint's {kind} hold NaN or leave part of the arena unwritten")
        z3_converted = os.path.join(tmp, "converted_zero3")
        run([f, "convert", "--checkpoint", os.path.join(zero3, "checkpoints", "step-000020"), "--out", z3_converted],
            env)
        want = read_safetensors(os.path.join(zero3, "model.safetensors"))
        got = read_safetensors(os.path.join(z3_converted, "model.safetensors"))
        if sorted(want) != sorted(got) or any(not np.array_equal(want[t], got[t]) for t in want):
            failures.append("--zero 3: the final model differs from its step-20 checkpoint consolidated")
        else:
            print(f"--zero 3: 4 rank files of about 3P/N; the final model equals its last checkpoint ({len(got)} tensors)")
        out = os.path.join(tmp, "zero3_to_zero2")
        train(out, 3, ["--zero", "2", "--resume", z3_step10])
        failures += compare("4 ranks ZeRO-3 -> 3 ranks ZeRO-2", base, out, from_step=10)

        # convert --checkpoint: the 4 ranks' last step folder is the trained model.
        step20 = os.path.join(writer, "checkpoints", "step-000020")
        converted = os.path.join(tmp, "converted")
        run([f, "convert", "--checkpoint", step20, "--out", converted], env)
        want = read_safetensors(os.path.join(writer, "model.safetensors"))
        got = read_safetensors(os.path.join(converted, "model.safetensors"))
        if sorted(want) != sorted(got):
            failures.append(f"convert --checkpoint: tensors {sorted(got)[:5]}... vs the model's {sorted(want)[:5]}...")
        elif any(not np.array_equal(want[t], got[t]) for t in want):
            failures.append("convert --checkpoint: the weights differ from the trained model's")
        else:
            print(f"convert --checkpoint: {len(got)} tensors equal to the trained model's")
        for name in ("config.json", "flotilla_tokenizer.json"):  # the tiny preset's byte tokenizer
            if not os.path.exists(os.path.join(converted, name)):
                failures.append(f"convert --checkpoint wrote no {name}")
        text = ["--text", "The fleet sails as one."]
        scores = [run([f, "score", "--model", m] + text, env) for m in (writer, converted)]
        if scores[0] != scores[1] or not scores[0].strip():
            failures.append(f"flotilla score: the trained model gives {scores[0]!r}, the converted one {scores[1]!r}")
        else:
            print("flotilla score: the converted model scores as the trained one")
        # It refuses to overwrite a non-empty --out.
        proc = subprocess.run([f, "convert", "--checkpoint", step20, "--out", converted], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("flotilla: error:")]
        if proc.returncode != 2 or len(lines) != 1:
            failures.append(f"convert into a non-empty --out: exit {proc.returncode}, stderr {proc.stderr!r}")

        # Local SGD (DiLoCo: outer momentum) keeps per-rank state: each rank's AdamW moments
        # and outer momentum go into its rank-NNNNN.state.safetensors, so stopping and
        # resuming on the same world is the uninterrupted run, bit for bit; on another world
        # one warning line says they start fresh.
        diloco = ["--sync-every", "2", "--outer-lr", "0.7", "--outer-momentum", "0.9", "--steps", "8"]
        straight = os.path.join(tmp, "diloco")
        train(straight, 2, diloco)
        stopped = os.path.join(tmp, "diloco_saved")
        train(stopped, 2, diloco + ["--save-every", "4"])
        step4 = os.path.join(stopped, "checkpoints", "step-000004")
        if sorted(read_layout(step4).get("rank_state", {}).get("files", [])) != \
                ["rank-00000.state.safetensors", "rank-00001.state.safetensors"]:
            failures.append(f"local SGD: layout.json's rank_state is {read_layout(step4).get('rank_state')}")
        resumed = os.path.join(tmp, "diloco_resumed")
        log = train(resumed, 2, diloco + ["--resume", step4])
        if "warning" in log:
            failures.append(f"local SGD, same world: a warning:\n{log}")
        with open(os.path.join(straight, "model.safetensors"), "rb") as a, \
                open(os.path.join(resumed, "model.safetensors"), "rb") as b:
            if a.read() != b.read():
                failures.append("local SGD: stop at step 4 + resume on 2 ranks differs from the uninterrupted run")
            else:
                print("local SGD (DiLoCo), 2 ranks: stop + resume = the uninterrupted run, bit for bit")
        log = train(os.path.join(tmp, "diloco_one"), 1, diloco + ["--resume", step4])
        warnings = [line for line in log.splitlines() if line.startswith("warning:") and "per-rank state" in line]
        if len(warnings) != 1 or "2 ranks" not in warnings[0]:
            failures.append(f"local SGD on another world: expected one warning line, got {warnings}")
        else:
            print(f"local SGD, 2 -> 1 rank: {warnings[0][:90]}...")

        # Gradient compression keeps per-rank state too: the error-feedback residual, the
        # warm-up's position, PowerSGD's warm start Q and generator (codec.* in the state
        # file). Stop at step 4 + resume on 2 ranks = the uninterrupted run, bit for bit:
        # top-k, and PowerSGD in bf16 with a warm-up that ends before the checkpoint.
        for name, flags in (("top-k", ["--compression", "topk", "--topk-density", "0.1"]),
                            ("PowerSGD bf16", ["--compression", "powersgd", "--compression-warmup", "3",
                                               "--compression-dtype", "bf16"])):
            flags = flags + ["--steps", "8"]
            tag = name.split()[0].lower().replace("-", "")
            straight = os.path.join(tmp, f"{tag}_straight")
            train(straight, 2, flags)
            stopped = os.path.join(tmp, f"{tag}_saved")
            train(stopped, 2, flags + ["--save-every", "4"])
            resumed = os.path.join(tmp, f"{tag}_resumed")
            log = train(resumed, 2, flags + ["--resume", os.path.join(stopped, "checkpoints", "step-000004")])
            with open(os.path.join(straight, "model.safetensors"), "rb") as a, \
                    open(os.path.join(resumed, "model.safetensors"), "rb") as b:
                if a.read() != b.read() or "warning" in log:
                    failures.append(f"{name}: stop at step 4 + resume on 2 ranks differs from the uninterrupted run")
                else:
                    print(f"{name}, 2 ranks: stop + resume = the uninterrupted run, bit for bit")

        # A LoRA run's checkpoint converts to a PEFT adapter directory: the run's adapter.
        lora = os.path.join(tmp, "lora")
        train(lora, 3, ["--zero", "2", "--fine-tune-type", "lora", "--lora-rank", "4", "--save-every", "10"])
        adapter = os.path.join(tmp, "lora_adapter")
        run([f, "convert", "--checkpoint", lora, "--out", adapter], env)
        want = read_safetensors(os.path.join(lora, "adapter_model.safetensors"))
        got = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))
        if sorted(want) != sorted(got) or any(not np.array_equal(want[t], got[t]) for t in want) or \
                not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            failures.append(f"convert --checkpoint of a LoRA run: {sorted(os.listdir(adapter))}, tensors differ")
        else:
            print(f"convert --checkpoint of a LoRA run: a PEFT adapter of {len(got)} tensors equal to the run's")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures)


if __name__ == "__main__":
    sys.exit(main())
