#!/usr/bin/python3
"""PyTorch peer for flotilla's LoRA throughput benchmark (issue 4).

    /usr/bin/python3 bench/torch_lora_throughput.py --workload W2 --threads 2 --steps 3 --warmup 1

Builds the Llama model of tests/reference/torch_llama.py in float32 (the workloads of
bench/torch_train_throughput.py), freezes every base parameter (requires_grad_(False)) and
adapts q,k,v,o of every layer with LoRA as PEFT does it: y = x W^T + scale (x A^T) B^T,
scale = alpha / r, dropout 0 (PEFT's Identity), A kaiming-uniform(a = sqrt(5)), B zero
(torch_llama.LoraLinear). Times full training steps on random tokens: zero_grad, forward,
loss, backward, AdamW over the adapter parameters only. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import torch_llama  # noqa: E402
from torch_llama import LlamaForCausalLM, count_params  # noqa: E402

WORKLOADS = {
    "W1": dict(hidden_size=288, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768,
               vocab_size=32000, seq_len=256, batch_size=8),
    "W2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048,
               vocab_size=32000, seq_len=512, batch_size=4),
}


def make_adapters(model: LlamaForCausalLM, r: int, targets: list[str]) -> dict[str, nn.Parameter]:
    """PEFT-named lora_A / lora_B parameters for `targets` of every layer, initialised as
    PEFT's LoraLayer.reset_lora_parameters: A kaiming_uniform_(a=sqrt(5)), B zeros."""
    params = {}
    for layer in range(model.cfg.num_hidden_layers):
        for target in targets:
            base = model.get_submodule(torch_llama.lora_module_path(layer, target))
            out_features, in_features = base.weight.shape
            lora_a = nn.Parameter(torch.empty(r, in_features))
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            lora_b = nn.Parameter(torch.zeros(out_features, r))
            params[torch_llama.lora_tensor_name(layer, target, "A")] = lora_a
            params[torch_llama.lora_tensor_name(layer, target, "B")] = lora_b
    return params


def main() -> int:
    ap = argparse.ArgumentParser(description="PyTorch LoRA training-throughput peer")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="q,k,v,o", help="comma-separated: q,k,v,o,gate,up,down")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.rank < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --threads >= 1, --rank >= 1")
    targets = [t if t.endswith("_proj") else f"{t}_proj" for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(torch_llama.LORA_TARGETS))
    if unknown:
        ap.error(f"unknown targets {unknown}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    w = WORKLOADS[args.workload]
    B, T, V = w["batch_size"], w["seq_len"], w["vocab_size"]
    config = dict(model_type="llama", hidden_size=w["hidden_size"], intermediate_size=w["intermediate_size"],
                  num_hidden_layers=w["num_hidden_layers"], num_attention_heads=w["num_attention_heads"],
                  num_key_value_heads=w["num_attention_heads"], vocab_size=V, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=T)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # GPT-style init; the values do not affect the timing
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.requires_grad_(False)
    adapters = make_adapters(model, args.rank, targets)
    torch_llama.attach_lora(model, adapters, args.alpha / args.rank, dropout=0.0)
    model.train()
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-4)  # betas (0.9, 0.999), eps 1e-8, wd 0.01
    gen = torch.Generator().manual_seed(args.seed)

    def train_step() -> float:
        seq = torch.randint(0, V, (B, T + 1), generator=gen)
        tokens, targets_ = seq[:, :-1], seq[:, 1:]
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(tokens, targets_)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        train_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    elapsed_s = time.perf_counter() - start
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    trainable_base = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "workload": args.workload,
        "threads": args.threads,
        "params": count_params(model),
        "adapter_params": sum(p.numel() for p in adapters.values()),
        "trainable_base_params": trainable_base,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": args.targets,
        "batch": B,
        "seq": T,
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_s": B * T * args.steps / elapsed_s,
        "step_ms": 1000.0 * elapsed_s / args.steps,
        "last_loss": loss,
        "peak_rss_bytes": peak_rss_bytes,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
