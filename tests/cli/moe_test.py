#!/usr/bin/python3
"""Mixture-of-experts models through the flotilla binary (docs/moe.md):

    init --config configs/mixtral-tiny.json -> train a few steps -> generate (KV cache)
    -> train LoRA on the attention and every expert's w1/w2/w3 -> continue it
    (--resume-adapter-file) -> generate with the adapter -> fuse

and the same from scratch for a Qwen2-MoE config (dense and sparse layers, shared
expert). Checks, beyond every command exiting 0: the written model holds Mixtral's
tensor names (router, 8 experts x w1/w2/w3) and no dense MLP; training lowers the loss
and reports the load-balancing loss per step in metrics.jsonl (near its balanced value:
top-2 of 8 experts gives about 2 at random initialisation); generation is greedy and
repeatable; the adapter holds one pair per expert per projection under PEFT's names, and
the fused model generates what the base with the adapter generates (greedy). Qwen2-MoE:
LoRA on gate/up/down reaches its experts and its shared expert. convert --quantize 4
writes the experts stacked as mlx_lm does (switch_mlp), LoRA trains over that base, and
convert writes it back to float.

Usage: moe_test.py <path/to/flotilla>
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QWEN2_MOE = {
    "model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260, "max_position_embeddings": 256,
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "norm_topk_prob": False, "mlp_only_layers": [0],
    "output_router_logits": True, "router_aux_loss_coef": 0.01,
}


def run(flotilla, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([flotilla, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        sys.exit(f"FAIL: flotilla {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def tensor_bytes(path: Path, name: str) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return raw[8 + n + begin:8 + n + end]


def steps(run_dir: Path):
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def main() -> int:
    flotilla = sys.argv[1]
    root = Path(tempfile.mkdtemp(prefix="flotilla-moe-"))
    try:
        corpus = root / "corpus.txt"
        corpus.write_text("\n\n".join("the fleet sails as one while each ship holds what it must " * 4
                                      for _ in range(60)))
        model = root / "mixtral"
        run(flotilla, "init", "--config", REPO / "configs" / "mixtral-tiny.json", "--seed", "3", "--out", model)
        names = set(header(model / "model.safetensors")) - {"__metadata__"}
        for layer in range(2):
            check(f"model.layers.{layer}.block_sparse_moe.gate.weight" in names, f"router of layer {layer}")
            for e in range(8):
                for w in ("w1", "w2", "w3"):
                    check(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" in names,
                          f"expert {e} {w} of layer {layer}")
        check(not any(".mlp." in n for n in names), "a Mixtral model has no dense MLP")
        check(json.loads((model / "config.json").read_text())["num_local_experts"] == 8, "config.json")

        trained = root / "trained"
        run(flotilla, "train", "--model", model, "--data", corpus, "--out", trained, "--steps", "12",
            "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--eval-batches", "1")
        log = steps(trained)
        check(len(log) == 12, f"12 step records, got {len(log)}")
        check(all("router_aux_loss" in m for m in log), "router_aux_loss in every step record")
        aux = [m["router_aux_loss"] for m in log]
        # E * sum_e f_e P_e is K = 2 when routing is balanced; it is >= K... only in
        # expectation, so a loose band: anything far outside means a wrong formula.
        check(all(1.5 < a < 4.0 for a in aux), f"aux losses {aux}")
        check(log[-1]["loss"] < log[0]["loss"] - 0.5, f"loss {log[0]['loss']} -> {log[-1]['loss']}")

        outs = [run(flotilla, "generate", "--model", trained, "--prompt", "the fleet", "--max-tokens", "12",
                    "--temperature", "0", "--ignore-chat-template") for _ in range(2)]
        check(outs[0] == outs[1] and outs[0].strip(), f"greedy generation repeats: {outs}")

        lora = root / "lora"
        run(flotilla, "train", "--model", trained, "--data", corpus, "--out", lora, "--fine-tune-type", "lora",
            "--lora-targets", "q,k,v,o,w1,w2,w3", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--lr", "1e-2", "--eval-batches", "1")
        check((lora / "adapter_model.safetensors").is_file(), "adapter written")
        check(all("router_aux_loss" in m for m in steps(lora)), "router_aux_loss under LoRA")
        adapter = header(lora / "adapter_model.safetensors")
        for e in range(8):
            for w in ("w1", "w2", "w3"):
                name = f"base_model.model.model.layers.1.block_sparse_moe.experts.{e}.{w}.lora_B.weight"
                check(name in adapter, f"adapter tensor {name}")
        modules = json.loads((lora / "adapter_config.json").read_text())["target_modules"]
        check(set(modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"}, f"target_modules {modules}")
        more = root / "lora_more"
        run(flotilla, "train", "--model", trained, "--data", corpus, "--out", more, "--fine-tune-type", "lora",
            "--lora-targets", "q,k,v,o,w1,w2,w3", "--resume-adapter-file", lora, "--steps", "1", "--batch-size", "2",
            "--seq-len", "32", "--lr", "1e-2", "--eval-batches", "1")
        fused = root / "fused"
        run(flotilla, "fuse", "--model", trained, "--adapter", more, "--out", fused)
        check("model.layers.1.block_sparse_moe.experts.7.w2.weight" in header(fused / "model.safetensors"),
              "fused model keeps the experts")
        greedy = ["--prompt", "the fleet", "--max-tokens", "8", "--temperature", "0", "--ignore-chat-template"]
        with_adapter = run(flotilla, "generate", "--model", trained, "--adapter", more, *greedy)
        check(with_adapter == run(flotilla, "generate", "--model", fused, *greedy),
              "the fused model generates what base + adapter generate")
        # The fuse changed the w2 of exactly the experts whose adapter trained (B moved off zero:
        # the experts the router sent rows to; this corpus reaches most of them).
        expert = "model.layers.1.block_sparse_moe.experts.{}.w2.{}"
        changed = [e for e in range(8) if tensor_bytes(fused / "model.safetensors", expert.format(e, "weight")) !=
                   tensor_bytes(trained / "model.safetensors", expert.format(e, "weight"))]
        trained_b = [e for e in range(8) if any(tensor_bytes(more / "adapter_model.safetensors",
                                                             "base_model.model." + expert.format(e, "lora_B.weight")))]
        check(changed == trained_b and len(changed) >= 4, f"fuse changed experts {changed}; adapters trained {trained_b}")

        # 4 bits in mlx_lm's layout: each projection's experts stacked (switch_mlp), LoRA on the
        # experts over it, and back to float with the experts one by one.
        q4 = root / "mixtral_4bit"
        run(flotilla, "convert", "--model", trained, "--out", q4, "--quantize", "4", "--group-size", "32")
        q4_names = header(q4 / "model.safetensors")
        stack = q4_names.get("model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight", {})
        check(stack.get("shape", [0])[0] == 8 and not any(".experts." in n for n in q4_names),
              f"stacked experts in the 4-bit model: {stack}")
        run(flotilla, "train", "--model", q4, "--data", corpus, "--out", root / "lora_4bit", "--fine-tune-type", "lora",
            "--lora-targets", "w1,w2,w3", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1")
        back = root / "mixtral_float_again"
        run(flotilla, "convert", "--model", q4, "--out", back, "--dtype", "float32")
        check("model.layers.1.block_sparse_moe.experts.7.w2.weight" in header(back / "model.safetensors"),
              "converted back to float: the experts one by one")
        # The 4-bit model scores as the float model of its dequantized weights: the same
        # weights, products blockwise vs whole (float rounding; measured 5e-7).
        tokens = ["--tokens", "1,2,3,4,5,6,7,8"]
        lp4 = json.loads(run(flotilla, "score", "--model", q4, *tokens))["logprobs"]
        lpf = json.loads(run(flotilla, "score", "--model", back, *tokens))["logprobs"]
        check(max(abs(a - b) for a, b in zip(lp4, lpf)) < 1e-4, f"4-bit {lp4} vs dequantized float {lpf}")

        qcfg = root / "qwen2_moe.json"
        qcfg.write_text(json.dumps(QWEN2_MOE))
        qrun = root / "qwen2_moe_run"
        run(flotilla, "train", "--config", qcfg, "--data", corpus, "--out", qrun, "--steps", "4",
            "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--eval-batches", "1")
        qnames = set(header(qrun / "model.safetensors"))
        check("model.layers.0.mlp.gate_proj.weight" in qnames, "qwen2_moe layer 0 is dense")
        check("model.layers.1.mlp.shared_expert_gate.weight" in qnames, "qwen2_moe shared expert gate")
        check(all(math.isfinite(m["router_aux_loss"]) for m in steps(qrun)), "qwen2_moe aux loss")
        run(flotilla, "generate", "--model", qrun, "--prompt", "the", "--max-tokens", "4", "--ignore-chat-template")
        qlora = root / "qwen2_moe_lora"
        run(flotilla, "train", "--model", qrun, "--data", corpus, "--out", qlora, "--fine-tune-type", "lora",
            "--lora-targets", "gate,up,down", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--eval-batches", "1")
        qadapter = header(qlora / "adapter_model.safetensors")
        for name in ("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
                     "base_model.model.model.layers.1.mlp.shared_expert.up_proj.lora_A.weight",
                     "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight"):
            check(name in qadapter, f"qwen2_moe adapter tensor {name}")
        run(flotilla, "fuse", "--model", qrun, "--adapter", qlora, "--out", root / "qwen2_moe_fused")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("cli_moe: pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
