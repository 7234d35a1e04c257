"""A stand-in for `flotilla grads`, written with the float32 torch model.

Used only by `check_against_torch.py --self-test`, to show that the checker passes a
correct float32 implementation and fails a wrong one. It speaks the same contract:

    fake_flotilla.py grads --model DIR --batch batch.json --out out.safetensors

and, with FAKE_FLOTILLA_BUG set, computes a known bug instead: any mutation from
llama_mutations.py, or "drop_grad" (one gradient missing from the output) or
"count_ignored" (targets of -100 become token 0 and count in the loss).
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
    args = ap.parse_args()
    bug = os.environ.get("FAKE_FLOTILLA_BUG", "")

    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    weights = {n: t.to(torch.float32) for n, t in torch_llama.read_hf_weights(args.model).items()}
    if bug in llama_mutations.MUTATIONS:
        config, weights = llama_mutations.apply_mutation(bug, config, weights)
    model = torch_llama.LlamaForCausalLM(config)
    model.load_hf_state_dict(weights)

    with open(args.batch) as f:
        batch = json.load(f)
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)
    if bug == "count_ignored":
        targets = targets.clamp(min=0)

    logits, loss = model(tokens, targets)
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
    params = list(model.named_parameters())
    if bug == "drop_grad":
        params = params[1:]
    for name, p in params:
        out[f"grad.{name}"] = p.grad
    torch_llama.write_safetensors(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
