#!/usr/bin/python3
"""An mlx_lm or PEFT user's habits work in flotilla (issue 17, items 4 and 5).

Usage: mlx_lm_test.py <path/to/flotilla> [-k SUBSTRING] [--keep]

Each case runs the binary on a tiny random model (flotilla init --preset tiny, byte
tokenizer) and a small mlx_lm data folder of prompt/completion lines written here:
  - mlx_lm's flag names are accepted (train, generate, fuse, convert) and an unknown flag
    names the nearest known one;
  - a lora_config.yaml in mlx_lm's shape (lora_parameters, lr_schedule, null values) runs;
  - train --data takes the mlx_lm folder itself (same losses as data prepare + train),
    --mask-prompt applies, --test reports the test split;
  - an adapter in mlx_lm's layout (adapters.safetensors: lora_a (in, r), lora_b (r, out),
    adapter_config.json with lora_parameters) gives generate, fuse and resume exactly what
    the same adapter in PEFT layout gives;
  - every checkpoint folder is a loadable PEFT adapter; --resume-adapter-file takes a
    file or a folder, and LoRA flags that differ from the adapter are an error naming both;
  - base_model_name_or_path is absolute; --force into an old run folder clears its
    checkpoints.
"""

import array
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import cli_helpers
from cli_helpers import check, expect_error, expect_ok, metrics_steps, printed_config


def read_safetensors(path: Path) -> Dict[str, Tuple[List[int], array.array]]:
    """F32 tensors only (what flotilla writes): name -> (shape, values)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        check(info["dtype"] == "F32", f"{path}: {name} is {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        values = array.array("f")
        values.frombytes(raw[8 + n + begin:8 + n + end])
        out[name] = (info["shape"], values)
    return out


def write_safetensors(path: Path, tensors: Dict[str, Tuple[List[int], array.array]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        blob = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def transpose(shape: List[int], values: array.array) -> Tuple[List[int], array.array]:
    rows, cols = shape
    out = array.array("f", [0.0]) * (rows * cols)
    for r in range(rows):
        for c in range(cols):
            out[c * rows + r] = values[r * cols + c]
    return [cols, rows], out


def peft_to_mlx(peft: Path, mlx: Path, num_layers: int) -> None:
    """The same adapter in mlx_lm's layout, as mlx_lm.lora writes it."""
    cfg = json.loads((peft / "adapter_config.json").read_text())
    mlx.mkdir()
    tensors = {}
    for name, (shape, values) in read_safetensors(peft / "adapter_model.safetensors").items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj.lora_a
        stem = name[len("base_model.model."):-len(".weight")]
        stem = stem.replace(".lora_A", ".lora_a").replace(".lora_B", ".lora_b")
        tensors[stem] = transpose(shape, values)  # A (r, in) -> (in, r); B (out, r) -> (r, out)
    write_safetensors(mlx / "adapters.safetensors", tensors)
    block = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
             "gate": "mlp", "up": "mlp", "down": "mlp"}
    keys = [f"{block[m[:-len('_proj')]]}.{m}" for m in cfg["target_modules"]]
    (mlx / "adapter_config.json").write_text(json.dumps({
        "model": "mlx_model", "fine_tune_type": "lora", "num_layers": num_layers, "iters": 3,
        "lora_parameters": {"keys": keys, "rank": cfg["r"], "scale": cfg["lora_alpha"] / cfg["r"],
                            "dropout": 0.0}}, indent=2))


class Env(cli_helpers.Workspace):
    """A tiny model and an mlx_lm data folder, made once for all cases."""

    def __init__(self, flotilla: str, root: Path):
        super().__init__(flotilla, root)
        self.model = root / "model"
        self.data = root / "mlx_data"
        self._adapter = None
        cli_helpers.init_tiny(self.flotilla, self.model, 3, self.env)
        self.data.mkdir()
        for split, n in (("train", 60), ("valid", 10), ("test", 12)):
            lines = [json.dumps({"prompt": f"Say {split} number {i}.",
                                 "completion": f"Arr, {split} number {i} be here, matey."}) for i in range(n)]
            (self.data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")

    def train_lora(self, out: Path, *extra, data=None, steps=3) -> subprocess.CompletedProcess:
        return self.run(["train", "--model", self.model, "--data", data or self.data, "--out", out,
                         "--fine-tune-type", "lora", "--steps", steps, "--batch-size", "2", "--seq-len", "48",
                         "--lr", "0.01", "--warmup", "1", *extra])

    def adapter(self) -> Path:
        """A LoRA adapter (PEFT layout, q,v,down of both layers, rank 4) trained once per run."""
        if self._adapter is None:
            self._adapter = self.root / "adapter"
            expect_ok(self.train_lora(self._adapter, "--lora-rank", "4", "--lora-alpha", "12", "--lora-targets",
                                      "q,v,down"))
        return self._adapter


def generated(e: Env, *args) -> str:
    p = e.run(["generate", "--model", e.model, "--prompt", "Say test", "--max-tokens", "12", "--temperature", "0",
               *args])
    expect_ok(p)
    return p.stdout


# ---- 17.4: mlx_lm's flags and config file --------------------------------------------------

def case_train_takes_mlx_lm_flag_names(e: Env) -> None:
    p = e.run(["train", "--model", e.model, "--data", e.data, "--adapter-path", e.path("out"), "--iters", "7",
               "--learning-rate", "0.002", "--steps-per-report", "3", "--grad-accumulation-steps", "2",
               "--max-seq-length", "40", "--print-config"])
    expect_ok(p)
    got = printed_config(p.stdout)
    for key, value in {"steps": "7", "lr": "0.002", "log_every": "3", "grad_accum": "2", "seq_len": "40"}.items():
        check(got.get(key) == value, f"{key}: printed {got.get(key)!r}, expected {value!r}")
    check(got.get("out", "").endswith("-out"), f"--adapter-path did not set out: {got.get('out')}")


def case_unknown_flag_names_the_nearest(e: Env) -> None:
    expect_error(e.run(["train", "--model", e.model, "--data", e.data, "--out", e.path("out"), "--iter", "3"]),
                 ["--iter", "did you mean --iters?"])
    expect_error(e.run(["generate", "--model", e.model, "--temprature", "0"]), ["did you mean --temperature?"])
    expect_error(e.run(["data", "prepare", "--modl", e.model, "--data", e.data, "--out", e.path("out")]),
                 ["--modl", "did you mean --model?"])


def case_generate_fuse_convert_take_mlx_lm_flag_names(e: Env) -> None:
    base = generated(e)
    p = e.run(["generate", "--model", e.model, "-p", "Say test", "-m", "12", "--temp", "0"])
    expect_ok(p)
    check(p.stdout == base, f"-p/-m/--temp output {p.stdout!r} differs from the long flags' {base!r}")
    with_adapter = generated(e, "--adapter-path", e.adapter())
    check(with_adapter == generated(e, "--adapter", e.adapter()), "--adapter-path differs from --adapter")
    fused = e.path("fused")
    expect_ok(e.run(["fuse", "--model", e.model, "--adapter-path", e.adapter(), "--save-path", fused]))
    check((fused / "config.json").is_file(), "fuse --save-path wrote no model")
    # A model whose every Linear input width the group size 32 divides.
    config = json.loads((e.model / "config.json").read_text())
    config["intermediate_size"] = 128
    config_path = e.path("config.json")
    config_path.write_text(json.dumps(config))
    float_model = e.path("float-model")
    expect_ok(e.run(["init", "--config", config_path, "--out", float_model]))
    quantized = e.path("q8")
    expect_ok(e.run(["convert", "--hf-path", float_model, "--mlx-path", quantized, "-q", "--q-bits", "8",
                     "--q-group-size", "32"]))
    q = json.loads((quantized / "config.json").read_text())["quantization"]
    check(q.get("bits") == 8 and q.get("group_size") == 32, f"-q --q-bits 8 --q-group-size 32 wrote {q}")
    dequantized = e.path("deq")
    expect_ok(e.run(["convert", "--hf-path", quantized, "--mlx-path", dequantized, "--dequantize"]))
    check("quantization" not in json.loads((dequantized / "config.json").read_text()), "--dequantize kept quantization")
    refused = e.run(["convert", "--hf-path", float_model, "--mlx-path", e.path("x"), "-q", "--quantize", "4"])
    check(refused.returncode == 2, f"-q with --quantize accepted: {refused.stderr}")


MLX_YAML = """# The shape of mlx_lm's examples/lora_config.yaml, with this test's paths and sizes.
model: "{model}"
train: true
fine_tune_type: lora
training_mode: normal
optimizer: adamw
data: "{data}"
seed: 0
num_layers: 1
batch_size: 2
iters: 4
val_batches: 2
learning_rate: 1e-5
steps_per_report: 1
steps_per_eval: 2
resume_adapter_file: null
adapter_path: "{out}"
save_every: 2
test: true
test_batches: 2
max_seq_length: 48
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"]
  rank: 4
  scale: 5.0
  dropout: 0.0
lr_schedule:
  name: cosine_decay
  warmup: 2
  arguments: [2e-3, 2, 1e-4]
"""


def case_mlx_lm_lora_config_yaml_runs(e: Env) -> None:
    out = e.path("adapters")
    cfg = e.path("lora_config.yaml")
    cfg.write_text(MLX_YAML.format(model=e.model, data=e.data, out=out))
    p = e.run(["train", "-c", cfg])
    expect_ok(p)
    adapter = json.loads((out / "adapter_config.json").read_text())
    check(adapter["r"] == 4 and adapter["lora_alpha"] == 20.0, f"rank/alpha {adapter['r']}/{adapter['lora_alpha']}, "
                                                               "expected 4 and scale 5 x rank 4 = 20")
    check(sorted(adapter["target_modules"]) == ["q_proj", "up_proj", "v_proj"], f"targets {adapter['target_modules']}")
    check(adapter["layers_to_transform"] == [1], f"num_layers 1 adapted {adapter['layers_to_transform']}")
    steps = metrics_steps(out)
    check(len(steps) == 4, f"{len(steps)} steps, expected iters 4")
    # lr_schedule wins over learning_rate: warm-up to 2e-3 over 2 steps, cosine down to 1e-4.
    lrs = [s["lr"] for s in steps]
    check(abs(lrs[0] - 1e-3) < 1e-9 and abs(lrs[1] - 2e-3) < 1e-9, f"warm-up lrs {lrs[:2]}, expected 1e-3, 2e-3")
    check(lrs[2] <= 2e-3 + 1e-9 and lrs[3] < lrs[2] and abs(lrs[3] - 1e-4) < 1e-9,
          f"cosine lrs {lrs[2:]}, expected to reach the end value 1e-4 at the last step")
    got = printed_config(e.run(["train", "-c", cfg, "--print-config"]).stdout)
    for key, value in {"lr": "2e-3", "min_lr": "1e-4", "warmup": "2", "lora_rank": "4", "lora_scale": "5.0",
                       "lora_targets": "q,v,up", "steps": "4", "seq_len": "48", "test": "true"}.items():
        check(got.get(key) == value, f"{key}: printed {got.get(key)!r}, expected {value!r}")
    check((out / "checkpoints" / "step-000002").is_dir(), "save_every 2 wrote no checkpoint at step 2")
    check("test: loss" in p.stdout, f"test: true printed no test loss:\n{p.stdout}")
    check("test_loss" in json.loads((out / "report.json").read_text()), "report.json has no test_loss")


def case_mlx_lm_yaml_faults_are_named(e: Env) -> None:
    def run_with(text: str) -> Tuple[Path, subprocess.CompletedProcess]:
        cfg = e.path("bad.yaml")
        cfg.write_text(f"model: {e.model}\ndata: {e.data}\nadapter_path: {e.path('out')}\n" + text)
        return cfg, e.run(["train", "-c", cfg])
    cfg, p = run_with("lora_parameters:\n  keys: [\"self_attn.qkv_proj\"]\n")
    expect_error(p, [f"{cfg}:5", "self_attn.qkv_proj"])
    cfg, p = run_with("lr_schedule:\n  name: linear_schedule\n  arguments: [0.1, 0.0, 10]\n")
    expect_error(p, [f"{cfg}:5", "linear_schedule", "cosine_decay"])
    cfg, p = run_with("train: false\n")
    expect_error(p, [f"{cfg}:4", "train: false"])
    cfg, p = run_with("lora_parameters:\n  rnak: 8\n")
    expect_error(p, [f"{cfg}:5", "lora_parameters.rnak"])


# ---- 17.4: an mlx_lm data folder straight to train -------------------------------------------

def case_train_prepares_an_mlx_lm_data_folder(e: Env) -> None:
    prepared = e.path("prepared")
    expect_ok(e.run(["data", "prepare", "--model", e.model, "--data", e.data, "--out", prepared, "--mask-prompt",
                     "--max-seq-len", "48"]))
    a, b = e.path("from-prepared"), e.path("from-folder")
    expect_ok(e.train_lora(a, data=prepared))
    p = e.train_lora(b, "--mask-prompt", "--test")
    expect_ok(p)
    la = [s["loss"] for s in metrics_steps(a)]
    lb = [s["loss"] for s in metrics_steps(b)]
    check(la == lb, f"losses on the folder {lb} differ from prepared data's {la}")
    check("prepared" in p.stdout and "test: loss" in p.stdout, f"no preparation or test line:\n{p.stdout}")
    unmasked = e.path("unmasked")
    expect_ok(e.train_lora(unmasked))
    check([s["loss"] for s in metrics_steps(unmasked)] != lb, "--mask-prompt changed nothing")
    text = e.path("corpus.txt")
    text.write_text("plain text has no test split\n\n" * 40)
    expect_error(e.run(["train", "--model", e.model, "--data", text, "--out", e.path("x"), "--seq-len", "16",
                        "--test"]), ["--test", "test.jsonl"])


def case_folder_rows_follow_the_data_without_seq_len(e: Env) -> None:
    # Without --seq-len a data folder is cut as mlx_lm cuts it (2048, at most the model's
    # positions) and rows are as long as its longest training example: the same rows as
    # `data prepare` with no --max-seq-len and train without --seq-len.
    prepared = e.path("prepared-whole")
    expect_ok(e.run(["data", "prepare", "--model", e.model, "--data", e.data, "--out", prepared, "--mask-prompt"]))
    common = ["--model", e.model, "--fine-tune-type", "lora", "--steps", "3", "--batch-size", "2", "--lr", "0.01",
              "--warmup", "1"]
    a, b = e.path("rows-prepared"), e.path("rows-folder")
    pa = e.run(["train", "--data", prepared, "--out", a, *common])
    pb = e.run(["train", "--data", e.data, "--out", b, "--mask-prompt", *common])
    expect_ok(pa)
    expect_ok(pb)
    rows = json.loads((prepared / "index.json").read_text())["splits"]["train"]["longest"]
    check(f"rows of {rows} tokens" in pa.stdout, f"prepared data: no 'rows of {rows} tokens' line:\n{pa.stdout}")
    check(f"rows of {rows} tokens" in pb.stdout, f"data folder: no 'rows of {rows} tokens' line:\n{pb.stdout}")
    check("cut" not in pb.stdout, f"the folder's examples were cut:\n{pb.stdout}")
    la = [s["loss"] for s in metrics_steps(a)]
    lb = [s["loss"] for s in metrics_steps(b)]
    check(la == lb, f"losses on the folder {lb} differ from the prepared folder's {la}")


def case_grad_checkpoint_keeps_the_losses(e: Env) -> None:
    plain, checkpointed = e.path("plain"), e.path("checkpointed")
    # LoRA dropout (the recompute must draw the same masks) and two accumulated micro-batches.
    same = ["--lora-dropout", "0.1", "--grad-accum", "2"]
    expect_ok(e.train_lora(plain, *same))
    p = e.train_lora(checkpointed, *same, "--grad-checkpoint")
    expect_ok(p)
    check("gradient checkpointing" in p.stdout, f"no word of checkpointing:\n{p.stdout}")
    check([s["loss"] for s in metrics_steps(plain)] == [s["loss"] for s in metrics_steps(checkpointed)],
          "--grad-checkpoint changed the losses")
    cfg = e.path("gc.yaml")
    cfg.write_text(f"model: {e.model}\ndata: {e.data}\nadapter_path: {e.path('out')}\ngrad_checkpoint: true\n")
    check(printed_config(e.run(["train", "-c", cfg, "--print-config"]).stdout).get("grad_checkpoint") == "true",
          "grad_checkpoint: true not applied")
    # plan --grad-checkpoint plans the smaller activations and recommends the flag.
    plans = {}
    text = e.path("plan_corpus.txt")
    text.write_text("a plain text corpus for the planner's data count\n\n" * 40)
    for flag in ([], ["--grad-checkpoint"]):
        out = e.path("plan" + "".join(flag))
        p = e.run(["plan", "--model", e.model, "--data", text, "--batch-size", "2", "--seq-len", "48", "--no-run",
                   "--out", out, *flag])
        expect_ok(p)
        plans[bool(flag)] = (json.loads((out / "plan.json").read_text())["workload"], p.stdout)
    check(plans[True][0]["grad_checkpoint"] and plans[True][0]["activation_bytes"] < plans[False][0]["activation_bytes"],
          f"plan --grad-checkpoint: {plans[True][0]} vs {plans[False][0]}")
    check("--grad-checkpoint --out" in plans[True][1], f"plan does not recommend the flag:\n{plans[True][1]}")


# ---- 17.5: adapters interoperate ------------------------------------------------------------

def case_mlx_lm_adapter_folder_loads_for_generate_fuse_and_resume(e: Env) -> None:
    peft = e.adapter()
    mlx = e.path("mlx_adapter")
    peft_to_mlx(peft, mlx, num_layers=16)  # mlx_lm's default: past the model's 2 layers means all
    base = generated(e)
    with_peft = generated(e, "--adapter", peft)
    check(with_peft != base, "the trained adapter changes nothing; the test would prove nothing")
    check(generated(e, "--adapter", mlx) == with_peft, "mlx_lm layout generates other text than PEFT layout")
    fused_peft, fused_mlx = e.path("fused-peft"), e.path("fused-mlx")
    expect_ok(e.run(["fuse", "--model", e.model, "--adapter", peft, "--out", fused_peft]))
    expect_ok(e.run(["fuse", "--model", e.model, "--adapter", mlx, "--out", fused_mlx]))
    a = read_safetensors(fused_peft / "model.safetensors")
    b = read_safetensors(fused_mlx / "model.safetensors")
    for name, (shape, values) in a.items():
        check(b[name][0] == shape, f"{name}: shape {b[name][0]} vs {shape}")
        worst = max(abs(x - y) for x, y in zip(values, b[name][1]))
        check(worst <= 1e-6, f"{name}: fused weights differ by {worst}")
    r_peft, r_mlx = e.path("resume-peft"), e.path("resume-mlx")
    expect_ok(e.train_lora(r_peft, "--resume-adapter-file", peft))
    expect_ok(e.train_lora(r_mlx, "--resume-adapter-file", mlx / "adapters.safetensors"))
    lp = [s["loss"] for s in metrics_steps(r_peft)]
    lm = [s["loss"] for s in metrics_steps(r_mlx)]
    check(all(abs(x - y) <= 1e-5 for x, y in zip(lp, lm)), f"resumed losses differ: PEFT {lp}, mlx_lm {lm}")


def case_checkpoint_folder_is_a_peft_adapter(e: Env) -> None:
    out = e.path("run")
    expect_ok(e.train_lora(out, "--save-every", "3"))
    step = out / "checkpoints" / "step-000003"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        check((step / name).is_file(), f"{step} has no {name}")
    check(json.loads((step / "manifest.json").read_text())["files"].get("adapter_config.json"),
          "the manifest does not checksum the adapter")
    check(generated(e, "--adapter", step) == generated(e, "--adapter", out),
          "the last checkpoint's adapter differs from the run's")
    expect_ok(e.train_lora(e.path("resumed"), "--resume-adapter-file", step / "adapter_model.safetensors"))


def case_resume_adapter_mismatch_names_both(e: Env) -> None:
    adapter = e.adapter()
    expect_error(e.train_lora(e.path("x"), "--resume-adapter-file", adapter, "--lora-rank", "8"),
                 ["--lora-rank 8", "rank 4", str(adapter)])
    expect_error(e.train_lora(e.path("x"), "--resume-adapter-file", adapter, "--lora-targets", "q,v"),
                 ["--lora-targets q_proj,v_proj", "q_proj,v_proj,down_proj"])
    # The adapter's own values are no mismatch.
    expect_ok(e.train_lora(e.path("ok"), "--resume-adapter-file", adapter, "--lora-rank", "4",
                           "--lora-targets", "down,q,v"))


def case_base_model_path_is_absolute(e: Env) -> None:
    out = e.path("run")
    p = subprocess.run([e.flotilla, "train", "--model", e.model.name, "--data", e.data, "--out", out,
                        "--fine-tune-type", "lora", "--steps", "1", "--seq-len", "48"],
                       cwd=e.model.parent, capture_output=True, text=True, env=e.env, timeout=cli_helpers.CASE_TIMEOUT_S)
    expect_ok(p)
    written = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    check(written == str(e.model.resolve()), f"base_model_name_or_path {written!r}, expected {str(e.model)!r}")


def case_force_clears_an_old_runs_checkpoints(e: Env) -> None:
    out = e.path("run")
    expect_ok(e.train_lora(out, "--save-every", "1", "--keep-checkpoints", "0", steps=4))
    check((out / "checkpoints" / "step-000004").is_dir(), "first run left no step 4")
    p = e.train_lora(out, "--save-every", "1", "--force", steps=2)
    expect_ok(p)
    left = sorted(d.name for d in (out / "checkpoints").iterdir() if d.name.startswith("step-"))
    check(left == ["step-000001", "step-000002"], f"checkpoints after --force: {left}")
    check((out / "checkpoints" / "latest").read_text().strip() == "step-000002", "latest is not the new run's")


def main() -> int:
    return cli_helpers.main_of_cases(globals(), "flotilla-mlx-lm-", Env)


if __name__ == "__main__":
    sys.exit(main())
