#!/usr/bin/python3
"""PyTorch peer for flotilla's training-throughput benchmark.

    /usr/bin/python3 bench/torch_train_throughput.py --workload W1 --threads 2 --steps 5 --warmup 1

Builds the Llama model of tests/reference/torch_llama.py (the ordinary eager
implementation as Hugging Face writes it: matmul, masked softmax, matmul; torch 1.13 has
no scaled_dot_product_attention) in float32 and times full AdamW training steps on
random tokens: zero_grad, forward, loss, backward, optimizer step. Prints one JSON line.

Workloads (untied embeddings, MHA, rms eps 1e-5, rope theta 1e4):
    W1  hidden 288, 6 layers,  6 heads,  ffn 768,  vocab 32000, seq 256, batch 8
    W2  hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000, seq 512, batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from torch_llama import LlamaForCausalLM, count_params  # noqa: E402

WORKLOADS = {
    "W1": dict(hidden_size=288, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768,
               vocab_size=32000, seq_len=256, batch_size=8),
    "W2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048,
               vocab_size=32000, seq_len=512, batch_size=4),
}


def make_model(w: dict) -> LlamaForCausalLM:
    """The workload's Llama in float32, in training mode (also used by the DDP peer)."""
    config = dict(model_type="llama", hidden_size=w["hidden_size"], intermediate_size=w["intermediate_size"],
                  num_hidden_layers=w["num_hidden_layers"], num_attention_heads=w["num_attention_heads"],
                  num_key_value_heads=w["num_attention_heads"], vocab_size=w["vocab_size"], rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=w["seq_len"])
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # GPT-style init; the values do not affect the timing
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.train()
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description="PyTorch training-throughput peer")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --steps >= 1, --warmup >= 0, --threads >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    w = WORKLOADS[args.workload]
    B, T, V = w["batch_size"], w["seq_len"], w["vocab_size"]
    model = make_model(w)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)

    def train_step() -> float:
        seq = torch.randint(0, V, (B, T + 1), generator=gen)
        tokens, targets = seq[:, :-1], seq[:, 1:]
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        train_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    elapsed_s = time.perf_counter() - start

    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "workload": args.workload,
        "threads": args.threads,
        "params": count_params(model),
        "batch": B,
        "seq": T,
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_s": B * T * args.steps / elapsed_s,
        "step_ms": 1000.0 * elapsed_s / args.steps,
        "last_loss": loss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
