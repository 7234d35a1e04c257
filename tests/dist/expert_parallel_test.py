#!/usr/bin/env python3
"""Expert parallelism (--parallel ep=E) = one rank with the same global batch.

Trains configs/mixtral-tiny.json (8 experts, top 2, aux loss on) alone with micro-batch G,
then under mpirun with G split over the ranks: ep=2, ep=4, dp=2 x ep=2 and plain dp=2
(whose load-balancing loss is also the formula over the whole batch). Every step's loss
and router aux loss must match the 1-rank run to 1e-5 relative (the aux loss of the 1-rank
run is the formula over all the batch's tokens, so matching it shows the ranks' statistics
are combined, not averaged), and every final weight tensor to 1e-5 relative in norm (each
element to 1e-4 of the tensor's largest, as train_equivalence_test.py: see compare).
Tolerance: the ranks compute every row as one rank does; only sums over rows (a weight
gradient, the all-reduce) run in another order, float32 rounding at ~1e-7 relative per
step, grown by 12 AdamW steps.

A checkpoint written under dp=2 x ep=2 (each rank holding only its experts) resumes on one
rank, and one written alone resumes under ep=4, both ending where the uninterrupted run
ends. LoRA on the attention and every expert's w1/w2/w3 under ep=2 and dp=2 = one rank
(losses and the saved adapters, same tolerances): each ep rank runs and updates its experts'
adapters, and only the shared adapters' gradients are exchanged (report.json's bytes). With
--expert-capacity 0.5, ep=2 = one rank too (the same assignments dropped: the capacity is
per sequence). Tensor and pipeline parallelism on the mixture (issue 15): tp=2 and pp=2 =
one rank, same tolerances, and ep=2 x tp=2 with --sequence-parallel and ep=2 x pp=2 in
their first 4 steps' losses and aux losses; report.json's tp and pipeline bytes; tp=2's
checkpoint resumes on one rank and one rank's at tp=2; LoRA on the experts at tp=2 = one rank.
Also: each rank says which block of experts it runs; ep that does not divide the experts,
ep on a dense model, and a model directory missing an expert's tensor (one only the other
rank holds) are refused with one line (exit 2).
Usage: expert_parallel_test.py FLOTILLA [--mpirun MPIRUN]
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np  # Debian's python3-numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_util import mpi_env, mpirun_argv, run, script_args, summary  # noqa: E402  (next to this file)
SOURCE = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-5
ELEMENT_TOL = 1e-4


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype="<f4").reshape(info["shape"])
    return out


def drop_tensor(src_dir, dst_dir, name):
    """A copy of model directory src_dir whose model.safetensors lacks tensor `name`."""
    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, "model.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    kept, chunks, at = {}, [], 0
    for key, info in header.items():
        if key == "__metadata__":
            kept[key] = info
        elif key != name:
            b, e = info["data_offsets"]
            chunks.append(data[b:e])
            kept[key] = dict(info, data_offsets=[at, at + e - b])
            at += e - b
    head = json.dumps(kept).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))


def metrics(run_dir, from_step=0):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "loss" in r and r["step"] > from_step]


def compare(name, base_dir, other_dir, from_step=0, weights="model.safetensors", weight_tol=TOL,
            element_tol=ELEMENT_TOL, losses=True):
    failures = []
    base, other = (metrics(base_dir, from_step), metrics(other_dir, from_step)) if losses else ([], [])
    if len(base) != len(other):
        failures.append(f"{name}: {len(base)} vs {len(other)} steps")
    worst_loss = worst_aux = 0.0
    for a, b in zip(base, other):
        for key in ("loss", "router_aux_loss"):
            err = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            if key == "loss":
                worst_loss = max(worst_loss, err)
            else:
                worst_aux = max(worst_aux, err)
            if err > TOL:
                failures.append(f"{name}: step {a['step']} {key} {a[key]!r} (1 rank) vs {b[key]!r}, rel {err:.2e}")
    wa = read_safetensors(os.path.join(base_dir, weights))
    wb = read_safetensors(os.path.join(other_dir, weights))
    if set(wa) != set(wb):
        failures.append(f"{name}: {weights} holds other tensors: {sorted(set(wa) ^ set(wb))[:4]}")
    worst_w = worst_e = 0.0
    for t in wa:
        # Relative in norm: |W_ep - W_1| / |W_1| over the tensor.
        err = float(np.linalg.norm(wa[t] - wb[t])) / max(float(np.linalg.norm(wa[t])), 1e-12)
        worst_w = max(worst_w, err)
        if err > weight_tol:
            failures.append(f"{name}: weight {t} differs by {err:.2e} relative (norm)")
        # Elementwise, relative to the tensor's largest value: AdamW divides each gradient by
        # its own running scale, so the rounding of a near-zero gradient entry moves its
        # weight by up to ~lr x its relative error; plain dp=2 shows the same ~2e-5 here.
        elem = float(np.abs(wa[t] - wb[t]).max()) / max(float(np.abs(wa[t]).max()), 1e-12)
        worst_e = max(worst_e, elem)
        if elem > element_tol:
            failures.append(f"{name}: weight {t} differs by {elem:.2e} of its largest value")
    print(f"{name:<16} max rel err: loss {worst_loss:.2e}, aux {worst_aux:.2e}, weights {worst_w:.2e} (norm), "
          f"{worst_e:.2e} (largest element)")
    return failures


def compare_losses(name, base_dir, other_dir, steps):
    """Every step's loss and aux loss of other_dir's `steps` steps against base_dir's first."""
    failures = []
    base, other = metrics(base_dir)[:steps], metrics(other_dir)
    if len(other) != steps:
        return [f"{name}: {len(other)} steps, not {steps}"]
    worst = 0.0
    for a, b in zip(base, other):
        for key in ("loss", "router_aux_loss"):
            err = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            worst = max(worst, err)
            if err > TOL:
                failures.append(f"{name}: step {a['step']} {key} {a[key]!r} (1 rank) vs {b[key]!r}, rel {err:.2e}")
    print(f"{name:<16} max rel err over {steps} steps: loss and aux {worst:.2e}")
    return failures


def refused(cmd, env, expect):
    """The command fails with exit 2 and one error line containing `expect`."""
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    errors = sorted({line for line in proc.stderr.splitlines() if line.startswith("flotilla: error:")})
    if proc.returncode != 2 or len(errors) != 1 or expect not in errors[0]:
        return [f"{' '.join(cmd[-4:])}: exit {proc.returncode}, error lines {errors} (want one with {expect!r})"]
    print(f"refused: {errors[0]}")
    return []


def main():
    args = script_args()
    env = mpi_env()
    mpirun = mpirun_argv(args.mpirun)
    tmp = tempfile.mkdtemp(prefix="flotilla_ep_")
    failures = []
    try:
        model = os.path.join(tmp, "model")
        run([args.flotilla, "init", "--config", os.path.join(SOURCE, "configs/mixtral-tiny.json"), "--out", model,
             "--seed", "5"], env)
        data = ["--data", os.path.join(SOURCE, "data/sample/corpus.jsonl")]
        global_batch = 8
        common = ["--steps", "12", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2", "--seed", "11",
                  "--grad-accum", "2", "--log-every", "1", "--eval-every", "0"] + data
        base = os.path.join(tmp, "one_rank")
        run([args.flotilla, "train", "--model", model, "--out", base, "--batch-size", str(global_batch)] + common, env)
        for mesh, ranks in (("ep=2", 2), ("ep=4", 4), ("dp=2,ep=2", 4), ("dp=2", 2)):
            out = os.path.join(tmp, mesh.replace(",", "_").replace("=", ""))
            log = run(mpirun + ["-np", str(ranks), args.flotilla, "train", "--model", model, "--out", out,
                                "--parallel", mesh, "--batch-size", str(global_batch // ranks)] + common, env)
            if "ep=" in mesh:
                ep = int(mesh.split("ep=")[1])
                if f"this rank runs experts [0, {8 // ep}) of 8" not in log:
                    failures.append(f"{mesh}: rank 0 did not say which experts it runs:\n{log}")
            failures += compare(mesh, base, out)
        # An expert capacity (0.5: ceil(0.5 x 32 x 2 / 8) = 4 of a sequence's 64 assignments per
        # expert) drops the same assignments on one rank and under ep=2: its cut is per
        # sequence. Losses, aux and weights to the tolerances above; the dropped share equal.
        capped = common[:]
        capped[capped.index("--steps") + 1] = "4"
        capped += ["--expert-capacity", "0.5"]
        capped_runs = {"1 rank": os.path.join(tmp, "capped_one_rank"), "ep=2": os.path.join(tmp, "capped_ep2")}
        run([args.flotilla, "train", "--model", model, "--out", capped_runs["1 rank"], "--batch-size",
             str(global_batch)] + capped, env)
        run(mpirun + ["-np", "2", args.flotilla, "train", "--model", model, "--out", capped_runs["ep=2"],
                      "--parallel", "ep=2", "--batch-size", str(global_batch // 2)] + capped, env)
        failures += compare("capacity ep=2", capped_runs["1 rank"], capped_runs["ep=2"])
        dropped = {k: [r["expert_dropped"] for r in metrics(v)] for k, v in capped_runs.items()}
        print(f"capacity 0.5: dropped per step {dropped['1 rank']} (1 rank), {dropped['ep=2']} (ep=2)")
        if not all(d > 0.05 for d in dropped["1 rank"]):
            failures.append(f"capacity 0.5 dropped too little to test: {dropped['1 rank']}")
        if any(abs(a - b) > 1e-9 for a, b in zip(dropped["1 rank"], dropped["ep=2"])):
            failures.append(f"capacity: ep=2 dropped {dropped['ep=2']}, one rank {dropped['1 rank']}")
        if metrics(capped_runs["1 rank"])[0]["loss"] == metrics(base)[0]["loss"]:
            failures.append("capacity 0.5 gave the dropless run's first loss")
        # LoRA on the experts: the adapters of an expert get their gradient on the ranks that run
        # it, zero elsewhere, and the data group's sum is the one-rank gradient. Losses to 1e-5
        # of one rank (measured 3e-9), and ep=2's adapters to 1e-5 of plain dp=2's (measured
        # 1.0e-6). Against one rank the adapters get 1e-4 in norm: B starts at zero, and AdamW's
        # first steps turn the sum-order rounding of an expert's near-zero gradient entries
        # into lr-sized moves; plain dp=2 shows the same 1.2e-5 in the same tensor as ep=2.
        lora = common[:]
        lora[lora.index("--steps") + 1] = "4"
        lora += ["--fine-tune-type", "lora", "--lora-targets", "q,v,w1,w2,w3", "--lora-rank", "4", "--save-every", "2"]
        lora_runs = {"1 rank": os.path.join(tmp, "lora_one_rank")}
        run([args.flotilla, "train", "--model", model, "--out", lora_runs["1 rank"], "--batch-size",
             str(global_batch)] + lora, env)
        for mesh in ("ep=2", "dp=2"):
            lora_runs[mesh] = os.path.join(tmp, "lora_" + mesh.replace("=", ""))
            run(mpirun + ["-np", "2", args.flotilla, "train", "--model", model, "--out", lora_runs[mesh],
                          "--parallel", mesh, "--batch-size", str(global_batch // 2)] + lora, env)
            failures += compare(f"LoRA {mesh}", lora_runs["1 rank"], lora_runs[mesh], weights="adapter_model.safetensors",
                                weight_tol=1e-4, element_tol=1e-3)
        failures += compare("LoRA ep=2 v dp=2", lora_runs["dp=2"], lora_runs["ep=2"],
                            weights="adapter_model.safetensors")
        # A step folder's adapters are whole too: each ep rank's experts' adapters brought to
        # the writer (else another block's would be at their initial values there).
        failures += compare("LoRA ep=2 step 2", os.path.join(lora_runs["1 rank"], "checkpoints", "step-000002"),
                            os.path.join(lora_runs["ep=2"], "checkpoints", "step-000002"),
                            weights="adapter_model.safetensors", weight_tol=1e-4, element_tol=1e-3, losses=False)
        # Under ep=2 (no replicas) only the shared adapters (q, v) are summed; each rank
        # updates its own experts' adapters alone. dp=2 sums all of them. The bytes follow
        # the floats summed (both the same ring formula; alignment padding aside: 2%).
        adapters = read_safetensors(os.path.join(lora_runs["1 rank"], "adapter_model.safetensors"))
        shared = sum(t.size for name, t in adapters.items() if ".experts." not in name)
        whole = sum(t.size for t in adapters.values())
        sent = {}
        for mesh in ("ep=2", "dp=2"):
            with open(os.path.join(lora_runs[mesh], "report.json")) as f:
                sent[mesh] = json.load(f)["gradient_bytes_per_step"]
        print(f"LoRA gradient bytes per step: ep=2 {sent['ep=2']:.0f}, dp=2 {sent['dp=2']:.0f}; "
              f"shared adapters {shared} of {whole} floats")
        if not (sent["dp=2"] > 0 and abs(sent["ep=2"] / sent["dp=2"] - shared / whole) <= 0.02):
            failures.append(f"LoRA ep=2 sent {sent['ep=2']:.0f} bytes a step against dp=2's {sent['dp=2']:.0f}: "
                            f"expected the shared adapters' share, {shared / whole:.3f}")
        # Checkpoints: written under dp=2 x ep=2 (each block of experts written by its replica
        # of dp index 0, the shared tensors cut over the 4 ranks) and resumed alone, written
        # alone and resumed under ep=4; each ends where the uninterrupted 1-rank run ends.
        for writer_mesh, writer_ranks, reader_mesh, reader_ranks in (("dp=2,ep=2", 4, None, 1),
                                                                     (None, 1, "ep=4", 4)):
            writer = os.path.join(tmp, f"ckpt_{writer_ranks}")
            launcher = mpirun + ["-np", str(writer_ranks)] if writer_ranks > 1 else []
            mesh = ["--parallel", writer_mesh] if writer_mesh else []
            run(launcher + [args.flotilla, "train", "--model", model, "--out", writer, "--save-every", "6",
                            "--batch-size", str(global_batch // writer_ranks)] + mesh + common, env)
            checkpoint = os.path.join(writer, "checkpoints", "step-000006")
            out = os.path.join(tmp, f"resumed_{reader_ranks}")
            launcher = mpirun + ["-np", str(reader_ranks)] if reader_ranks > 1 else []
            mesh = ["--parallel", reader_mesh] if reader_mesh else []
            log = run(launcher + [args.flotilla, "train", "--model", model, "--out", out, "--resume", checkpoint,
                                  "--batch-size", str(global_batch // reader_ranks)] + mesh + common, env)
            if "resumed from" not in log:
                failures.append(f"the run on {reader_ranks} ranks did not say it resumed:\n{log}")
            failures += compare(f"{writer_mesh or '1 rank'} -> {reader_mesh or '1 rank'}", base, out, from_step=6)
        # The one-rank checkpoint resumed at tp=2: each rank takes its slices of it.
        out = os.path.join(tmp, "resumed_tp2")
        run(mpirun + ["-np", "2", args.flotilla, "train", "--model", model, "--out", out, "--resume",
                      os.path.join(tmp, "ckpt_1", "checkpoints", "step-000006"), "--parallel", "tp=2",
                      "--batch-size", str(global_batch)] + common, env)
        failures += compare("1 rank -> tp=2", base, out, from_step=6)
        # LoRA on the attention and the experts at tp=2 (each expert's adapters split as a
        # dense layer's) = one rank, the tolerances of LoRA under ep above.
        lora_runs["tp=2"] = os.path.join(tmp, "lora_tp2")
        run(mpirun + ["-np", "2", args.flotilla, "train", "--model", model, "--out", lora_runs["tp=2"],
                      "--parallel", "tp=2", "--batch-size", str(global_batch)] + lora, env)
        failures += compare("LoRA tp=2", lora_runs["1 rank"], lora_runs["tp=2"], weights="adapter_model.safetensors",
                            weight_tol=1e-4, element_tol=1e-3)
        # Tensor and pipeline parallelism on the mixture (issue 15 with experts), against the
        # same one-rank run. tp=2 (each rank reads its slices of every expert from the model
        # directory: gate and up by rows, down by columns; the router whole) and ep=2 x tp=2
        # with --sequence-parallel (each tp rank's ep group exchanges whole rows, each rank
        # runs its block of experts' slices, the tp all-reduce sums them); pp=2
        # (one stage a layer, the load-balancing loss's statistics passed up the stages and
        # its totals down) with each accumulation step a micro-batch, and ep=2 x pp=2 (each
        # stage's ep group exchanging rows for its layers, several micro-batches in flight;
        # the statistics summed over the last stage's data group, dp x ep). Same
        # tolerances: the split sums round otherwise than one rank's, as dense tp's do.
        # The 4-rank runs (two cores oversubscribed in CI) take 4 of the 12 steps: their
        # losses and aux losses against one rank's first 4, the weights left to the others.
        for mesh, ranks, rows, steps, extra in (
                ("tp=2", 2, global_batch, 12, ["--save-every", "6"]),
                ("ep=2,tp=2", 4, global_batch // 2, 4, ["--sequence-parallel"]),
                ("pp=2", 2, global_batch, 12, []),
                ("ep=2,pp=2", 4, global_batch // 2, 4, [])):
            out = os.path.join(tmp, mesh.replace(",", "_").replace("=", ""))
            short = common[:]
            short[short.index("--steps") + 1] = str(steps)
            log = run(mpirun + ["-np", str(ranks), args.flotilla, "train", "--model", model, "--out", out,
                                "--parallel", mesh, "--batch-size", str(rows)] + extra + short, env)
            if "tp=" in mesh and "tensor parallel: tp=2" not in log:
                failures.append(f"{mesh}: the log does not name the split:\n{log}")
            if steps == 12:
                failures += compare(mesh, base, out)
            else:
                failures += compare_losses(mesh, base, out, steps)
        # What rank 0 moved a step (report.json), as flotilla plan models it. tp=2: R = 2 x 8 x
        # 32 rows, the dense model's 4 all-reduces of R x 64 floats a layer, 2 at the ends and
        # the loss's 3R, plus each MoE layer's combine weights' gradient (R x K floats); pp=2:
        # each micro-batch's 8 x 32 x 64 activations and the 2E + 3 router statistics.
        R = 2 * global_batch * 32
        with open(os.path.join(tmp, "tp2", "report.json")) as r:
            got = json.load(r)["tensor_parallel"]["activation_bytes_per_step"]
        want = (2 * 4 + 2) * R * 64 * 4 + 3 * R * 4 + 2 * R * 2 * 4
        if got != want:
            failures.append(f"tp=2: report.json says {got} tp bytes a step, not {want}")
        with open(os.path.join(tmp, "pp2", "report.json")) as r:
            got = json.load(r)["pipeline"]["p2p_bytes_per_step"]
        want = 2 * (global_batch * 32 * 64 * 4 + (2 * 8 + 3) * 8)
        if got != want:
            failures.append(f"pp=2: report.json says {got} pipeline bytes a step, not {want}")
        # tp=2's step-6 checkpoint (the slices gathered whole) resumed on one rank.
        out = os.path.join(tmp, "tp2_resumed_alone")
        run([args.flotilla, "train", "--model", model, "--out", out, "--batch-size", str(global_batch), "--resume",
             os.path.join(tmp, "tp2", "checkpoints", "step-000006")] + common, env)
        failures += compare("tp=2 -> 1 rank", base, out, from_step=6)
        failures += refused(mpirun + ["-np", "3", args.flotilla, "train", "--model", model, "--out",
                                      os.path.join(tmp, "ep3"), "--parallel", "ep=3"] + common, env,
                            "experts per layer do not divide among 3")
        # A tensor of an expert only rank 1 holds is missing: every rank refuses alike.
        missing = "model.layers.1.block_sparse_moe.experts.7.w2.weight"
        drop_tensor(model, os.path.join(tmp, "missing_expert"), missing)
        failures += refused(mpirun + ["-np", "2", args.flotilla, "train", "--model", os.path.join(tmp, "missing_expert"),
                                      "--out", os.path.join(tmp, "missing_out"), "--parallel", "ep=2"] + common, env,
                            missing)
        dense = os.path.join(tmp, "dense")
        run([args.flotilla, "init", "--preset", "tiny", "--out", dense, "--seed", "5"], env)
        failures += refused(mpirun + ["-np", "2", args.flotilla, "train", "--model", dense, "--out",
                                      os.path.join(tmp, "dense_ep"), "--parallel", "ep=2"] + common, env,
                            "has no experts")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary(failures)


if __name__ == "__main__":
    sys.exit(main())
