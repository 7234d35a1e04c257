#!/usr/bin/python3
"""Smoke test of the quantized workflow through the flotilla binary, on a tiny model:

    init (float) -> convert --quantize 4 -> generate -> train --fine-tune-type lora (a few
    steps) -> generate --adapter -> fuse --de-quantize -> generate / score with the fused float model
    (and fuse without --de-quantize: quantized again, MLX layout)

Checks, beyond every command exiting 0: the converted directory is in MLX's layout (U32
packed weights, F16 scales and biases, config "quantization"); the quantized model's
per-token log-probabilities are within 0.05 nats of the float model's (an N(0, 0.02) model
has logits near 0 and log-probabilities near -log(V), so 4-bit noise moves them by
~1e-3; a broken dequantization moves them by whole nats); the fused, de-quantized model is
float (F32, no .scales, no "quantization") and scores within the same 0.05 nats of the
quantized base, since three steps at lr 1e-4 barely move the adapters.

Usage: quant_smoke_test.py <path/to/flotilla>
"""

import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def run(flotilla, *args):
    proc = subprocess.run([flotilla, *map(str, args)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"FAIL: flotilla {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def logprob_gap(flotilla, a, b, text):
    """The largest difference (nats) between two models' log-probabilities of text's tokens."""
    la, lb = (json.loads(run(flotilla, "score", "--model", m, "--text", text))["logprobs"] for m in (a, b))
    return max(abs(x - y) for x, y in zip(la, lb))


def train_lora(flotilla, model, corpus, out, targets, steps):
    run(flotilla, "train", "--model", model, "--data", corpus, "--out", out, "--fine-tune-type", "lora",
        "--lora-targets", targets, "--steps", steps, "--batch-size", "2", "--seq-len", "16", "--lr", "1e-4",
        "--eval-batches", "1")


def main() -> int:
    flotilla = sys.argv[1]
    root = Path(tempfile.mkdtemp(prefix="flotilla-quant-smoke-"))
    try:
        cfg = root / "config.json"
        cfg.write_text(json.dumps(CONFIG))
        corpus = root / "corpus.txt"
        corpus.write_text("\n\n".join("the fleet sails as one while each ship holds what it must " * 4
                                      for _ in range(60)))
        f, q = root / "float", root / "q4"
        run(flotilla, "init", "--config", cfg, "--seed", "3", "--out", f)
        run(flotilla, "convert", "--model", f, "--out", q, "--quantize", "4", "--group-size", "32")
        h = header(q / "model.safetensors")
        assert h["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "U32", h["model.layers.0.self_attn.q_proj.weight"]
        assert h["model.layers.0.self_attn.q_proj.weight"]["shape"] == [64, 8]
        assert h["model.layers.0.self_attn.q_proj.scales"]["dtype"] == "F16"
        assert h["model.layers.0.self_attn.q_proj.biases"]["shape"] == [64, 2]
        assert json.loads((q / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 4}

        out = run(flotilla, "generate", "--model", q, "--prompt", "the fleet", "--max-tokens", "8", "--verbose",
                  "--temperature", "0")
        assert out.startswith("the fleet"), out
        text = "the fleet sails as one"
        worst = logprob_gap(flotilla, f, q, text)
        assert worst < 0.05, f"quantized log-probabilities differ by {worst} nats"

        run_dir = root / "run"
        train_lora(flotilla, q, corpus, run_dir, "q,k,v,o", 3)
        assert (run_dir / "adapter_model.safetensors").is_file()

        # Adapters over the quantized base at generation time (run alongside, not merged).
        run(flotilla, "generate", "--model", q, "--adapter", run_dir, "--prompt", "the fleet", "--max-tokens", "4")

        fused = root / "fused"
        run(flotilla, "fuse", "--model", q, "--adapter", run_dir, "--out", fused, "--de-quantize")
        fh = header(fused / "model.safetensors")
        assert fh["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "F32"
        assert not any(k.endswith(".scales") for k in fh)
        assert "quantization" not in json.loads((fused / "config.json").read_text())
        worst = logprob_gap(flotilla, fused, q, text)
        assert worst < 0.05, f"fused model differs from its quantized base by {worst} nats"
        run(flotilla, "generate", "--model", fused, "--prompt", "the fleet", "--max-tokens", "4")

        requant = root / "fused_q"
        run(flotilla, "fuse", "--model", q, "--adapter", run_dir, "--out", requant)
        assert header(requant / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]["dtype"] == "U32"
        run(flotilla, "score", "--model", requant, "--text", text)

        # A layer whose input dimension the group size does not divide stays float, as
        # mlx_lm leaves it, and convert names it: intermediate 96 with group size 64 leaves
        # every down_proj float. The mixed model generates, trains LoRA (down included) and
        # fuses, re-quantized the same way.
        mixed_cfg = root / "mixed_config.json"
        mixed_cfg.write_text(json.dumps({**CONFIG, "intermediate_size": 96}))
        mf, mq = root / "mixed_float", root / "mixed_q4"
        run(flotilla, "init", "--config", mixed_cfg, "--seed", "4", "--out", mf)
        said = run(flotilla, "convert", "--model", mf, "--out", mq, "--quantize", "4", "--group-size", "64")
        assert "left float: 2 of 16 weights" in said and "input dimension 96: model.layers.{0..1}.mlp.down_proj" in said, said
        mh = header(mq / "model.safetensors")
        assert mh["model.layers.1.mlp.down_proj.weight"]["dtype"] == "F16", mh["model.layers.1.mlp.down_proj.weight"]
        assert "model.layers.1.mlp.down_proj.scales" not in mh
        assert mh["model.layers.1.mlp.up_proj.weight"]["dtype"] == "U32"
        mq_quant = json.loads((mq / "config.json").read_text())["quantization"]
        assert mq_quant["model.layers.0.mlp.down_proj"] is False and mq_quant["group_size"] == 64, mq_quant
        worst = logprob_gap(flotilla, mf, mq, text)
        # 4-bit noise at group size 64 measured 0.03..0.07 nats here; a float layer read as
        # packed words, or the reverse, moves them by whole nats.
        assert worst < 0.15, f"mixed quantized log-probabilities differ by {worst} nats"
        mixed_run = root / "mixed_run"
        train_lora(flotilla, mq, corpus, mixed_run, "q,v,down", 2)
        mixed_fused = root / "mixed_fused_q"
        run(flotilla, "fuse", "--model", mq, "--adapter", mixed_run, "--out", mixed_fused)
        fh = header(mixed_fused / "model.safetensors")
        assert fh["model.layers.0.mlp.down_proj.weight"]["dtype"] == "F16" and fh["model.layers.0.mlp.up_proj.weight"]["dtype"] == "U32", fh
        run(flotilla, "score", "--model", mixed_fused, "--text", text)
        print("PASS: convert -> generate -> LoRA train -> fuse --de-quantize (and re-quantized fuse); "
              "a mixed conversion (a layer left float) loads, trains and fuses")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
