"""Known porting bugs, expressed as changes to a correct model's config or weights.

A check against the reference is only worth something if it fails when the feature is
wrong. Each mutation below gives exactly the model a buggy implementation would compute,
without adding bug switches to torch_llama.py:

  rope_interleaved  rotary pairs (x[2i], x[2i+1]) (GPT-J / Meta layout) instead of
                    Hugging Face's (x[i], x[i + HD/2]). Running HF's rotate_half on q/k
                    rows permuted within each head by [0, 2, 4, ..., 1, 3, 5, ...] is the
                    interleaved rotation; q.k is unchanged by the common permutation.
  kv_tile           query head h reads kv head h % NKV instead of h // (NH/NKV). The
                    same as HF's mapping after moving query head h to slot
                    (h % NKV) * group + h // NKV (q_proj rows and o_proj columns together).
  no_qkv_bias       Qwen2's q/k/v biases ignored.
  no_rope_scaling   Llama 3 rope scaling ignored.
  moe_w1_w3_swapped Mixtral's w1 (gate) and w3 (up) read the other way round.
  moe_norm_topk_flipped  the top-k weights renormalised where the config says not (or
                    the other way round): norm_topk_prob flipped (Qwen2-MoE).
  moe_no_shared_gate  Qwen2-MoE's shared expert gate not computed from the token:
                    shared_expert_gate's weights zeroed (a constant gate of 0.5).

and LoRA bugs (LORA_MUTATIONS, at the end), as changes to the adapter.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch

from torch_llama import LlamaConfig

MUTATIONS = ("rope_interleaved", "kv_tile", "no_qkv_bias", "no_rope_scaling", "moe_w1_w3_swapped",
             "moe_norm_topk_flipped", "moe_no_shared_gate")


def applicable_mutations(config: dict) -> List[str]:
    cfg = LlamaConfig(config)
    out = ["rope_interleaved"]
    if cfg.num_attention_heads // cfg.num_key_value_heads > 1 and cfg.num_key_value_heads > 1:
        out.append("kv_tile")  # with one kv head every mapping is the same
    if cfg.qkv_bias:
        out.append("no_qkv_bias")
    if cfg.rope_scaling is not None:
        out.append("no_rope_scaling")
    if cfg.model_type == "mixtral":
        out.append("moe_w1_w3_swapped")
    if cfg.model_type == "qwen2_moe":
        out.append("moe_norm_topk_flipped")
        if cfg.shared_expert_intermediate_size > 0:
            out.append("moe_no_shared_gate")
    return out


def _permute_head_rows(t: torch.Tensor, n_heads: int, head_dim: int, perm: torch.Tensor) -> torch.Tensor:
    """t: (n_heads * head_dim, ...) -> same, with rows inside each head reordered."""
    rest = t.shape[1:]
    return t.reshape(n_heads, head_dim, *rest)[:, perm].reshape(n_heads * head_dim, *rest)


def apply_mutation(name: str, config: dict, weights: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    config = copy.deepcopy(config)
    weights = dict(weights)
    cfg = LlamaConfig(config)
    NH, NKV, HD = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layers = range(cfg.num_hidden_layers)
    if name == "rope_interleaved":
        perm = torch.cat((torch.arange(0, HD, 2), torch.arange(1, HD, 2)))
        for i in layers:
            for proj, heads in (("q_proj", NH), ("k_proj", NKV)):
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.self_attn.{proj}.{kind}"
                    if key in weights:
                        weights[key] = _permute_head_rows(weights[key], heads, HD, perm)
    elif name == "kv_tile":
        group = NH // NKV
        slot_of = [(h % NKV) * group + h // NKV for h in range(NH)]
        head_at_slot = torch.empty(NH, dtype=torch.long)
        for h, s in enumerate(slot_of):
            head_at_slot[s] = h
        rows = (head_at_slot[:, None] * HD + torch.arange(HD)[None, :]).reshape(-1)
        for i in layers:
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.self_attn.q_proj.{kind}"
                if key in weights:
                    weights[key] = weights[key][rows]
            key = f"model.layers.{i}.self_attn.o_proj.weight"
            weights[key] = weights[key][:, rows]
    elif name == "no_qkv_bias":
        for key in list(weights):
            if key.endswith("_proj.bias"):
                weights[key] = torch.zeros_like(weights[key])
    elif name == "no_rope_scaling":
        config["rope_scaling"] = None
    elif name == "moe_w1_w3_swapped":
        for key in list(weights):
            if key.endswith(".w1.weight"):
                other = key[:-len("w1.weight")] + "w3.weight"
                weights[key], weights[other] = weights[other], weights[key]
    elif name == "moe_norm_topk_flipped":
        config["norm_topk_prob"] = not cfg.norm_topk_prob
    elif name == "moe_no_shared_gate":
        for key in list(weights):
            if key.endswith("shared_expert_gate.weight"):
                weights[key] = torch.zeros_like(weights[key])
    else:
        raise ValueError(f"unknown mutation {name!r}; known: {MUTATIONS}")
    return config, weights


# ----------------------------------------------------------------------------- LoRA

# LoRA porting bugs, as changes to a correct adapter's settings and tensors (PEFT names).
# Every change is a differentiable function of the given tensors, so a stand-in can
# compute the buggy model and still report gradients for the adapter's own tensors.
#
#   lora_scale_twice     scale applied twice: (alpha / r)^2 instead of alpha / r.
#   lora_no_scale        scale forgotten (1 instead of alpha / r).
#   lora_A_transposed    A's (r, in) buffer read as (in, r) and transposed.
#   lora_B_transposed    B's (out, r) buffer read as (r, out) and transposed.
#   lora_layers_shifted  layers_to_transform [k..L-1] applied to layers [0..L-1-k].
#   lora_kv_swapped      the k_proj and v_proj adapters exchanged.
LORA_MUTATIONS = ("lora_scale_twice", "lora_no_scale", "lora_A_transposed", "lora_B_transposed",
                  "lora_layers_shifted", "lora_kv_swapped")


def applicable_lora_mutations(r: int, lora_alpha: float, target_modules, layers_to_transform) -> List[str]:
    out = []
    if lora_alpha / r != 1.0:  # scale 1: both scale bugs compute the right model
        out += ["lora_scale_twice", "lora_no_scale"]
    out += ["lora_A_transposed", "lora_B_transposed"]
    if layers_to_transform is not None and min(layers_to_transform) > 0:
        out.append("lora_layers_shifted")
    if "k_proj" in target_modules and "v_proj" in target_modules:
        out.append("lora_kv_swapped")
    return out


def apply_lora_mutation(name: str, scale: float, tensors: Dict[str, torch.Tensor]) -> Tuple[float, Dict[str, torch.Tensor]]:
    """(scale, tensors) of the buggy model. Names stay PEFT's; shapes stay the same."""
    tensors = dict(tensors)
    if name == "lora_scale_twice":
        return scale * scale, tensors
    if name == "lora_no_scale":
        return 1.0, tensors
    if name in ("lora_A_transposed", "lora_B_transposed"):
        suffix = ".lora_A.weight" if name == "lora_A_transposed" else ".lora_B.weight"
        for n, t in tensors.items():
            if n.endswith(suffix):
                rows, cols = t.shape
                tensors[n] = t.reshape(cols, rows).t()
        return scale, tensors
    if name == "lora_layers_shifted":
        layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in tensors})
        shift = layers[0]
        out = {}
        for n, t in tensors.items():
            head, rest = n.split(".layers.", 1)
            layer, tail = rest.split(".", 1)
            out[f"{head}.layers.{int(layer) - shift}.{tail}"] = t
        return scale, out
    if name == "lora_kv_swapped":
        out = {}
        for n, t in tensors.items():
            if ".k_proj." in n:
                out[n.replace(".k_proj.", ".v_proj.")] = t
            elif ".v_proj." in n:
                out[n.replace(".v_proj.", ".k_proj.")] = t
            else:
                out[n] = t
        return scale, out
    raise ValueError(f"unknown LoRA mutation {name!r}; known: {LORA_MUTATIONS}")
