"""A stand-in for `flotilla grads`, written with the float32 torch model.

Used only by `check_against_torch.py --self-test`, to show that the checker passes a
correct float32 implementation and fails a wrong one. It speaks the same contract:

    fake_flotilla.py grads --model DIR --batch batch.json --out out.safetensors [--adapter DIR]

and, with FAKE_FLOTILLA_BUG set, computes a known bug instead: any mutation from
llama_mutations.py (LoRA ones with --adapter), or "drop_grad" (one gradient missing from
the output) or "count_ignored" (targets of -100 become token 0 and count in the loss);
with --adapter also "lora_dA_unscaled" (dA lacks the factor alpha / r; the forward is
right), "lora_backward_stops_early" (the lowest adapted layer gets zero gradients) and
"base_grads" (the base's gradients are written too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_mutations  # noqa: E402
import torch_llama  # noqa: E402


def main() -> int:
    torch.set_num_threads(2)
    ap = argparse.ArgumentParser(prog="fake_flotilla")
    ap.add_argument("command", choices=["grads"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter")
    args = ap.parse_args()
    bug = os.environ.get("FAKE_FLOTILLA_BUG", "")

    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    weights = {n: t.to(torch.float32) for n, t in torch_llama.read_hf_weights(args.model).items()}
    if bug in llama_mutations.MUTATIONS:
        config, weights = llama_mutations.apply_mutation(bug, config, weights)
    model = torch_llama.LlamaForCausalLM(config)
    model.load_hf_state_dict(weights)
    trained = dict(model.named_parameters())
    if args.adapter:
        lora_config, tensors = torch_llama.read_peft_adapter(args.adapter)
        scale = lora_config["lora_alpha"] / lora_config["r"]
        leaves = {n: t.to(torch.float32).requires_grad_(True) for n, t in tensors.items()}
        used = dict(leaves)
        if bug in llama_mutations.LORA_MUTATIONS:
            scale, used = llama_mutations.apply_lora_mutation(bug, scale, used)
        elif bug == "lora_dA_unscaled":  # forward value A, gradient dA / scale
            used = {n: (t.detach() + (t - t.detach()) / scale) if n.endswith(".lora_A.weight") else t
                    for n, t in used.items()}
        elif bug == "lora_backward_stops_early":
            lowest = min(int(n.split(".layers.")[1].split(".")[0]) for n in used)
            used = {n: t.detach() if f".layers.{lowest}." in n else t for n, t in used.items()}
        if bug != "base_grads":
            model.requires_grad_(False)
        torch_llama.attach_lora(model, used, scale)
        trained = {**(trained if bug == "base_grads" else {}), **leaves}

    with open(args.batch) as f:
        batch = json.load(f)
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)
    if bug == "count_ignored":
        targets = targets.clamp(min=0)

    logits, loss = model(tokens, targets)
    out = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
    trained_loss = loss
    if model.aux_loss is not None:  # a mixture of experts, as flotilla grads writes it
        out["router_aux_loss"] = model.aux_loss.detach().reshape(1)
        if model.cfg.output_router_logits:
            trained_loss = loss + model.cfg.router_aux_loss_coef * model.aux_loss
    trained_loss.backward()
    params = list(trained.items())
    if bug == "drop_grad":
        params = params[1:]
    for name, p in params:
        out[f"grad.{name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    torch_llama.write_safetensors(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
