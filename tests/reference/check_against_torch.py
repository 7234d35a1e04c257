#!/usr/bin/python3
"""flotilla's model against an independent PyTorch reference (torch_llama.py).

    check_against_torch.py FLOTILLA_BIN [--seed S] [--cases a,b] [--keep] [--dtype float32|bf16]
    FLOTILLA_BIN=... check_against_torch.py
        For each case: random model and batch (seed printed), saved as a Hugging Face
        directory; runs `FLOTILLA_BIN grads --model DIR --batch batch.json --out
        out.safetensors` (LoRA cases add `--adapter ADAPTER_DIR`, a PEFT adapter written
        here); compares logits, loss and every gradient with the float64 torch reference.
        Exit 0 when all pass, 1 otherwise.
    check_against_torch.py --check-written DIR
        Loads a directory flotilla wrote (config.json + model.safetensors or shards with
        model.safetensors.index.json) into the torch model, with exact name and shape
        checks, and runs a forward pass.
    check_against_torch.py --self-test [--seed S]
        Tests this checker without flotilla: safetensors round trips and corrupt files,
        --check-written on good and bad directories, and the whole comparison run
        against fake_flotilla.py, correct (must pass) and with known bugs (must fail).

The `grads` contract: batch.json is {"tokens": [[...] * T] * B, "targets": same shape},
targets aligned with tokens (no shift) and -100 meaning ignored. out.safetensors (F32)
holds "logits" (B, T, V), "loss" (1,) = mean cross entropy over targets != -100, for a
mixture of experts "router_aux_loss" (1,) (the load-balancing loss; the gradients are
then of loss + router_aux_loss_coef * router_aux_loss when output_router_logits), and
"grad.<name>" for every parameter under its Hugging Face name (tied embeddings: only
model.embed_tokens.weight, no lm_head). With --adapter the base is frozen: the gradients
are "grad.<PEFT name>" of every adapter tensor and nothing else, e.g.
"grad.base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" (r, in).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import llama_mutations  # noqa: E402
import torch_llama  # noqa: E402
from torch_llama import IGNORE_INDEX, LlamaForCausalLM  # noqa: E402

# Relative error = max|flotilla - reference| / max|reference|, per tensor. The reference
# runs in float64, so this measures flotilla's float32 error alone: unit roundoff 6e-8,
# grown by accumulation over sums of at most a few hundred terms (C, F, V <= 300) through
# a few layers, gives ~1e-6..1e-5 (the float32 torch model reaches ~1e-6 here; see
# --self-test). 1e-4 leaves a 10x margin, while every porting bug in llama_mutations.py
# moves the logits by 1e-2..1 relative (checked for each case as "sensitivity").
TOLERANCE = 1e-4
# --dtype bf16: flotilla's matrix products take bf16 inputs (8-bit mantissa: each input
# rounded with relative error <= u = 2^-9) and accumulate in float32. A product's terms then
# err by <= 2u |a b| each, in random directions, so a length-K sum errs by ~2u sqrt(K) rms|ab|
# against a result of ~sqrt(K) rms|ab| (random weights): ~2u relative per product, as a
# standard deviation. A gradient here passes through a chain of up to ~30 products (3
# layers of q/k/v, o, gate/up, down forward and backward, the lm_head, LoRA's two), errors
# adding in quadrature: ~2u sqrt(30) ~= 11u; the worst of a tensor's hundreds to thousands
# of elements lies ~3.5 standard deviations out: ~40u = 0.08 at most (measured: 0.013-0.05
# over the cases and seeds 1, 2). Attention's products in bf16 (QK^T, PV, and backward's
# four, with P and dS rounded too) lengthen a layer's chain by two forward and two backward
# links: ~40 products, ~2u sqrt(40) ~= 13u, worst ~45u = 0.09 (measured: largest error of
# any tensor 0.028, 0.032, 0.035 over seeds 1-3, against 0.031, 0.035, 0.035 before they
# went bf16). The bound is 64u = 2^-3. What it still catches: a product
# that accumulated in bf16 (error ~u sqrt(K) per product, K up to 300: 50-100u standard
# deviation over the chain, worst elements 0.3 and beyond), a stale or wrong weight copy
# (O(1)), a LoRA or lm_head product left out.
TOLERANCE_BF16 = 2.0 ** -3
SENSITIVITY_MIN = 10 * TOLERANCE
GRADS_TIMEOUT_S = 300
BATCH, SEQ = 2, 7
TINY = 1e-30


# ----------------------------------------------------------------------------- cases


def _llama_gqa() -> dict:
    return dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5,
                rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
                max_position_embeddings=128)


def _qwen2_bias() -> dict:
    return dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6,
                rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False,
                max_position_embeddings=128, use_sliding_window=False)


def _mixtral() -> dict:
    """4 experts, top 2 (renormalised), GQA; the aux loss in the trained loss with a
    coefficient large enough that its gradient shows in the router's."""
    return dict(model_type="mixtral", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5,
                rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False,
                max_position_embeddings=128, sliding_window=None, num_local_experts=4, num_experts_per_tok=2,
                router_aux_loss_coef=0.1, output_router_logits=True)


def _qwen2_moe() -> dict:
    """Layer 0 dense (mlp_only_layers), layers 1-2 sparse: 5 experts, top 3 not
    renormalised, a shared expert with its sigmoid gate; q/k/v biases."""
    return dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6,
                rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False,
                max_position_embeddings=128, use_sliding_window=False, num_experts=5, num_experts_per_tok=3,
                moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
                decoder_sparse_step=1, mlp_only_layers=[0], router_aux_loss_coef=0.1,
                output_router_logits=True)


class Lora(NamedTuple):
    """A PEFT LoRA adapter for a case: rank, alpha, target modules, layers_to_transform
    (None: every layer)."""
    r: int
    alpha: int
    targets: Tuple[str, ...]
    layers: Optional[Tuple[int, ...]]

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class Case(NamedTuple):
    name: str
    config: dict
    save_dtype: torch.dtype  # the dtype the base weights are saved in
    weight_offset: int  # weight seed offset (the bf16 and LoRA cases reuse other cases' weights)
    lora: Optional[Lora] = None  # with an adapter: base frozen, only adapter gradients


CASES: List[Case] = [
    Case("llama_gqa", _llama_gqa(), torch.float32, 0),
    Case("qwen2_bias", _qwen2_bias(), torch.float32, 1),
    # Llama 3 scaling with original_max_position_embeddings 64: with HD 16 and theta 5e5
    # the wavelengths are 6.3, 32, 167, ... so one frequency is smoothed and the rest are
    # divided by 8 -- visible at positions 0..6 (see the sensitivity line). One kv head (MQA).
    Case("tied_llama3_rope", dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, vocab_size=300, rms_norm_eps=1e-5,
                                  rope_theta=500000.0,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64),
                                  tie_word_embeddings=True, max_position_embeddings=512),
             torch.float32, 2),
    Case("llama_gqa_bf16", _llama_gqa(), torch.bfloat16, 0),
    # head_dim given explicitly and != hidden/heads: q_proj is (NH*HD, C) = (64, 48).
    Case("mistral_head_dim", dict(model_type="mistral", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=257,
                                  rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, sliding_window=None,
                                  tie_word_embeddings=False, max_position_embeddings=128),
             torch.float32, 4),
    # LoRA on all seven targets of the last 2 of 3 layers (layer 0 is frozen and below every
    # adapter: backward may stop above it). Scale 8 / 4 = 2.
    Case("lora_llama_gqa", _llama_gqa(), torch.float32, 0,
         Lora(r=4, alpha=8, targets=torch_llama.LORA_TARGETS, layers=(1, 2))),
    # LoRA on the attention projections of every layer, over q/k/v biases; scale 12 / 8 = 1.5.
    Case("lora_qwen2_bias", _qwen2_bias(), torch.float32, 1,
         Lora(r=8, alpha=12, targets=("q_proj", "k_proj", "v_proj", "o_proj"), layers=None)),
    # Mixtures of experts: flotilla also writes "router_aux_loss" (1,), and its gradients
    # are those of loss + router_aux_loss_coef * router_aux_loss (output_router_logits).
    Case("mixtral", _mixtral(), torch.float32, 5),
    Case("qwen2_moe", _qwen2_moe(), torch.float32, 6),
]


def init_weights(config: dict, seed: int) -> Dict[str, torch.Tensor]:
    """float64 weights that keep activations O(1): linears N(0, gain^2/fan_in) (gain 1.5
    on q/k so attention scores are O(1) and the softmax is far from uniform), embeddings
    N(0, 1) (0.25 when tied, so the logits stay O(1)), norms U(0.5, 1.5), biases N(0, 0.5^2)."""
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    tied = model.cfg.tie_word_embeddings
    out = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
        elif name.endswith(".bias"):
            t = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif name == "model.embed_tokens.weight":
            t = (0.25 if tied else 1.0) * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            gain = 1.5 if (".q_proj." in name or ".k_proj." in name) else 1.0
            t = gain / shape[1] ** 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
        out[name] = t
    return out


def init_adapter(config: dict, lora: Lora, seed: int) -> Dict[str, torch.Tensor]:
    """float64 adapter tensors under PEFT's names. Both A and B are random (PEFT starts B
    at 0, which would make dA = 0 and hide every bug in A): A ~ N(0, 1/in) so x A^T is
    O(1), B ~ N(0, (0.5 / scale)^2 / r) so the adapter adds O(0.5) to each output, the
    same order as the base layer's O(1): neither drowns the other."""
    gen = torch.Generator().manual_seed(seed)
    cfg = torch_llama.LlamaConfig(config)
    C, F, Dq, Dkv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    shapes = dict(q_proj=(Dq, C), k_proj=(Dkv, C), v_proj=(Dkv, C), o_proj=(C, Dq),
                  gate_proj=(F, C), up_proj=(F, C), down_proj=(C, F))  # (out, in)
    layers = lora.layers if lora.layers is not None else range(cfg.num_hidden_layers)
    out = {}
    for layer in layers:
        for target in lora.targets:
            n_out, n_in = shapes[target]
            out[torch_llama.lora_tensor_name(layer, target, "A")] = \
                torch.randn(lora.r, n_in, generator=gen, dtype=torch.float64) / n_in ** 0.5
            out[torch_llama.lora_tensor_name(layer, target, "B")] = \
                torch.randn(n_out, lora.r, generator=gen, dtype=torch.float64) * (0.5 / lora.scale / lora.r ** 0.5)
    return out


def make_batch(vocab_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """tokens, targets: (B, T); 4 targets set to -100, at least one kept per row."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, vocab_size, (BATCH, SEQ), generator=gen)
    targets[0, 0] = IGNORE_INDEX
    targets[1, SEQ - 1] = IGNORE_INDEX
    for flat in torch.randperm(BATCH * SEQ, generator=gen)[:2].tolist():
        targets[flat // SEQ, flat % SEQ] = IGNORE_INDEX
    targets[:, 1] = torch.randint(0, vocab_size, (BATCH,), generator=gen)  # keep one per row
    return tokens, targets


def reference(config: dict, weights: Dict[str, torch.Tensor], tokens, targets,
              dtype: torch.dtype = torch.float64,
              adapter: Optional[Tuple[float, Dict[str, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
    """logits, loss and grad.<name> from the torch model running in `dtype`: of every
    parameter, or with adapter = (scale, PEFT-named tensors) of the adapter tensors only,
    the base frozen."""
    model = LlamaForCausalLM(config).to(dtype)
    model.load_hf_state_dict(weights)
    trained = dict(model.named_parameters())
    if adapter is not None:
        model.requires_grad_(False)
        scale, tensors = adapter
        trained = {n: t.detach().to(dtype).requires_grad_(True) for n, t in tensors.items()}
        torch_llama.attach_lora(model, trained, scale)
    logits, loss = model(tokens, targets)
    trained_loss = loss
    out = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
    if model.aux_loss is not None:
        out["router_aux_loss"] = model.aux_loss.detach().reshape(1)
        if model.cfg.output_router_logits:  # as transformers' MixtralForCausalLM trains
            trained_loss = loss + model.cfg.router_aux_loss_coef * model.aux_loss
    trained_loss.backward()
    for name, p in trained.items():
        out[f"grad.{name}"] = p.grad.detach()
    if adapter is not None and any(p.grad is not None for p in model.parameters()):
        raise AssertionError("the frozen base got a gradient in the reference")
    return out


# ----------------------------------------------------------------------------- comparison


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / max(b.abs().max().item(), TINY)).item()


def compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
            tolerance: float = TOLERANCE) -> Tuple[List[tuple], List[str]]:
    """rows (name, shape, max|ref|, rel err, status) and a list of failures."""
    rows, failures = [], []
    for name, b in want.items():
        if name not in got:
            rows.append((name, tuple(b.shape), b.abs().max().item(), None, "MISSING"))
            failures.append(f"{name}: missing from flotilla's output")
            continue
        a = got[name]
        if tuple(a.shape) != tuple(b.shape):
            rows.append((name, tuple(b.shape), b.abs().max().item(), None, f"SHAPE {tuple(a.shape)}"))
            failures.append(f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
            continue
        if a.dtype != torch.float32:
            failures.append(f"{name}: dtype {a.dtype}, expected float32 (F32)")
        err = rel_err(a, b)
        ok = err <= tolerance
        rows.append((name, tuple(b.shape), b.abs().max().item(), err, "ok" if ok else "FAIL"))
        if not ok:
            failures.append(f"{name}: rel err {err:.3e} > {tolerance:g}")
    for name in sorted(set(got) - set(want)):
        rows.append((name, tuple(got[name].shape), None, None, "UNEXPECTED"))
        failures.append(f"{name}: unexpected tensor in flotilla's output")
    return rows, failures


def print_table(rows: List[tuple]) -> None:
    width = max([52] + [len(row[0]) for row in rows])
    print(f"  {'tensor':<{width}} {'shape':<14} {'max|ref|':>10} {'rel err':>10}  status")
    for name, shape, ref_max, err, status in rows:
        ref_s = f"{ref_max:10.3e}" if ref_max is not None else f"{'-':>10}"
        err_s = f"{err:10.3e}" if err is not None else f"{'-':>10}"
        print(f"  {name:<{width}} {str(shape):<14} {ref_s} {err_s}  {status}")


def case_mutations(case: Case) -> List[str]:
    """The porting bugs a case can tell apart: the model's, or for a LoRA case the
    adapter's (the base model's bugs are the plain cases' job; the LoRA mutations say
    nothing about how a base bug would interact with the adapter)."""
    if case.lora is None:
        return llama_mutations.applicable_mutations(case.config)
    lora = case.lora
    return llama_mutations.applicable_lora_mutations(lora.r, lora.alpha, lora.targets, lora.layers)


def sensitivity(case: Case, weights, tokens, targets, want_logits,
                adapter: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[List[str], List[str]]:
    """How far each applicable porting bug moves the logits; too little means this case
    could not tell the bug from float32 noise."""
    lines, failures = [], []
    for mutation in case_mutations(case):
        m_config, m_weights = case.config, weights
        if case.lora is None:
            m_config, m_weights = llama_mutations.apply_mutation(mutation, case.config, weights)
        with torch.no_grad():
            model = LlamaForCausalLM(m_config).to(torch.float64)
            model.load_hf_state_dict(m_weights)
            if case.lora is not None:
                m_scale, m_adapter = llama_mutations.apply_lora_mutation(mutation, case.lora.scale, adapter)
                torch_llama.attach_lora(model, m_adapter, m_scale)
            logits, _ = model(tokens)
        d = rel_err(logits, want_logits)
        ok = d >= SENSITIVITY_MIN
        lines.append(f"{mutation}={d:.2e}{'' if ok else ' (TOO SMALL)'}")
        if not ok:
            failures.append(f"sensitivity: {mutation} moves logits by only {d:.2e} < {SENSITIVITY_MIN:g}")
    return lines, failures


def run_flotilla(binary: str, model_dir: str, batch_path: str, out_path: str,
                 adapter_dir: Optional[str] = None, dtype: str = "float32") -> Optional[str]:
    """None on success, else one line saying why."""
    cmd = [binary, "grads", "--model", model_dir, "--batch", batch_path, "--out", out_path]
    if dtype != "float32":
        cmd += ["--dtype", dtype]
    if adapter_dir is not None:
        cmd += ["--adapter", adapter_dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=GRADS_TIMEOUT_S)
    except OSError as e:
        return f"flotilla grads failed: cannot run {binary}: {e}"
    except subprocess.TimeoutExpired:
        return f"flotilla grads failed: no exit after {GRADS_TIMEOUT_S} s: {' '.join(cmd)}"
    if proc.returncode != 0:
        stderr = proc.stderr.strip() or "(empty stderr)"
        return f"flotilla grads failed: {stderr} [exit {proc.returncode}: {' '.join(cmd)}]"
    if not os.path.exists(out_path):
        return f"flotilla grads failed: exit 0 but {out_path} was not written"
    return None


def run_case(index: int, binary: str, base_seed: int, workdir: str, verbose: bool = True,
             dtype: str = "float32") -> List[str]:
    """Runs one case; returns its failures (empty when it passes)."""
    case = CASES[index]
    name, config, save_dtype, weight_offset, lora = case
    weight_seed, batch_seed = base_seed + weight_offset, base_seed + 100 + index
    adapter_seed = base_seed + 200 + index
    cfg = torch_llama.LlamaConfig(config)
    weights = init_weights(config, weight_seed)
    # The reference runs exactly the weights flotilla reads: rounded to the saved dtype.
    weights = {n: t.to(save_dtype).to(torch.float64) for n, t in weights.items()}
    adapter = None
    if lora is not None:  # saved as F32, as PEFT saves a float32 adapter
        adapter = {n: t.to(torch.float32).to(torch.float64)
                   for n, t in init_adapter(config, lora, adapter_seed).items()}
    tokens, targets = make_batch(cfg.vocab_size, batch_seed)

    case_dir = os.path.join(workdir, name)
    model_dir = os.path.join(case_dir, "model")
    adapter_dir = os.path.join(case_dir, "adapter") if lora is not None else None
    batch_path = os.path.join(case_dir, "batch.json")
    out_path = os.path.join(case_dir, "out.safetensors")
    torch_llama.save_hf_dir(model_dir, config, weights, save_dtype)
    if lora is not None:
        torch_llama.save_peft_adapter(adapter_dir, adapter, lora.r, lora.alpha, lora.targets,
                                      lora.layers, lora_dropout=0.0)
    with open(batch_path, "w") as f:
        json.dump({"tokens": tokens.tolist(), "targets": targets.tolist()}, f)

    if verbose:
        print(f"case {name}: {cfg.model_type} C={cfg.hidden_size} L={cfg.num_hidden_layers} "
              f"NH={cfg.num_attention_heads} NKV={cfg.num_key_value_heads} HD={cfg.head_dim} "
              f"F={cfg.intermediate_size} V={cfg.vocab_size} tied={cfg.tie_word_embeddings} "
              f"rope_scaling={'llama3' if cfg.rope_scaling else 'none'} weights={torch_llama._TORCH_TO_ST[save_dtype]} "
              f"B={BATCH} T={SEQ} ignored={int((targets == IGNORE_INDEX).sum())} "
              f"(weight seed {weight_seed}, batch seed {batch_seed})")
        if lora is not None:
            print(f"  LoRA r={lora.r} alpha={lora.alpha} scale={lora.scale:g} targets={','.join(lora.targets)} "
                  f"layers_to_transform={list(lora.layers) if lora.layers is not None else None} "
                  f"A, B random, {len(adapter)} tensors (adapter seed {adapter_seed})")
    want = reference(config, weights, tokens, targets,
                     adapter=(lora.scale, adapter) if lora is not None else None)
    sens_lines, failures = sensitivity(case, weights, tokens, targets, want["logits"], adapter)
    if verbose:
        print(f"  sensitivity (rel change of logits per porting bug): {', '.join(sens_lines)}")

    error = run_flotilla(binary, model_dir, batch_path, out_path, adapter_dir, dtype)
    if error:
        if verbose:
            print(f"  {error}")
        return failures + [error]
    try:
        got = torch_llama.read_safetensors(out_path)
    except ValueError as e:
        msg = f"flotilla's output is not valid safetensors: {e}"
        if verbose:
            print(f"  {msg}")
        return failures + [msg]
    rows, cmp_failures = compare(got, want, TOLERANCE_BF16 if dtype == "bf16" else TOLERANCE)
    if lora is not None:
        # compare() fails on any tensor the reference lacks as well; this names the fault.
        base_grads = sorted(n for n in got if n.startswith("grad.") and n[len("grad."):] in weights)
        if base_grads:
            failures.append(f"base frozen, yet flotilla wrote {len(base_grads)} base gradients "
                            f"(first: {base_grads[0]})")
        elif verbose:
            print(f"  no base gradients written ({len(adapter)} adapter gradients expected)")
    failures += cmp_failures
    if verbose:
        print_table(rows)
        for f in failures:
            print(f"  FAIL {f}")
        print(f"  case {name}: {'FAIL' if failures else 'pass'}")
    return failures


def run_all(binary: str, base_seed: int, case_names: Optional[List[str]], keep: bool,
            dtype: str = "float32") -> bool:
    indices = [i for i, c in enumerate(CASES) if case_names is None or c[0] in case_names]
    if dtype == "bf16":
        # A mixture's top-k choice is discontinuous: bf16 rounding (~1e-3 relative) flips a
        # token whose k-th and (k+1)-th router probs are that close, a few percent of runs,
        # and a flipped token differs by a whole expert's output. Checked in float32 only.
        moe = [i for i in indices if CASES[i].config["model_type"] in ("mixtral", "qwen2_moe")]
        if moe:
            print(f"skipped under bf16 (discontinuous routing): {', '.join(CASES[i].name for i in moe)}\n")
        indices = [i for i in indices if i not in moe]
    workdir = tempfile.mkdtemp(prefix="flotilla_reference_")
    failed = []
    try:
        for i in indices:
            if run_case(i, binary, base_seed, workdir, dtype=dtype):
                failed.append(CASES[i][0])
            print()
    finally:
        if keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    passed = len(indices) - len(failed)
    print(f"reference_torch: {passed}/{len(indices)} cases passed (seed {base_seed})"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return not failed


# ----------------------------------------------------------------------------- written models


def check_written_model(directory: str, seed: int = 0) -> dict:
    """Loads a Hugging Face directory written by flotilla into the torch model and runs
    a forward pass. Raises ValueError / FileNotFoundError naming the fault: a config the
    model cannot express, a corrupt safetensors file, a shard that disagrees with the
    index, a missing or unexpected tensor, a shape mismatch, non-float weights,
    non-finite logits. Returns a summary."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: missing")
    with open(config_path) as f:
        config = json.load(f)
    model = LlamaForCausalLM(config)
    tensors = torch_llama.read_hf_weights(directory)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    not_float = sorted(n for n, t in tensors.items()
                       if t.dtype not in (torch.float32, torch.float16, torch.bfloat16))
    if not_float:
        raise ValueError(f"{directory}: non-float weights {not_float}")
    model.load_hf_state_dict(tensors)

    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    T = min(8, cfg.max_position_embeddings)
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=gen)
    with torch.no_grad():
        logits, loss = model(tokens, tokens.roll(-1, dims=1))
    if not torch.isfinite(logits).all():
        raise ValueError(f"{directory}: forward pass gives non-finite logits")
    return dict(directory=directory, model_type=cfg.model_type, params=torch_llama.count_params(model),
                tensors=len(tensors), dtypes=dtypes, config_torch_dtype=config.get("torch_dtype"),
                loss=loss.item())


# ----------------------------------------------------------------------------- self-test


def _self_test_safetensors(tmp: str) -> List[str]:
    failures = []
    gen = torch.Generator().manual_seed(7)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(4, generator=gen).to(torch.float16),
        "bf16": torch.randn(2, 3, 2, generator=gen).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = os.path.join(tmp, "round_trip.safetensors")
    torch_llama.write_safetensors(path, tensors)
    with open(path, "rb") as f:
        n_header = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n_header))
    if n_header % 8 != 0 or header.get("__metadata__") != {"format": "pt"}:
        failures.append(f"safetensors header: length {n_header}, metadata {header.get('__metadata__')}")
    back = torch_llama.read_safetensors(path)
    for name, t in tensors.items():
        b = back.get(name)
        if b is None or b.dtype != t.dtype or b.shape != t.shape or not torch.equal(b, t):
            failures.append(f"safetensors round trip: {name} differs")
    # bf16 conversion rounds to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
    halfway = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], dtype=torch.float32).to(torch.bfloat16)
    if halfway.float().tolist() != [1.0, 1 + 2.0 ** -6]:
        failures.append(f"bf16 rounding is not round-to-nearest-even: {halfway.float().tolist()}")

    data = open(path, "rb").read()
    corrupt = {
        "truncated": data[:-4],
        "trailing bytes": data + b"\0" * 8,
        "header length past end": (len(data) * 2).to_bytes(8, "little") + data[8:],
        "bad json": data[:8] + b"[" + data[9:],
    }
    for what, blob in corrupt.items():
        bad = os.path.join(tmp, "corrupt.safetensors")
        with open(bad, "wb") as f:
            f.write(blob)
        try:
            torch_llama.read_safetensors(bad)
            failures.append(f"safetensors reader accepted a corrupt file ({what})")
        except ValueError:
            pass
    return failures


def _write_sharded(directory: str, src_dir: str, n_shards: int) -> None:
    """Copies a single-file HF directory as n shards + model.safetensors.index.json."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(src_dir, "config.json"), directory)
    tensors = torch_llama.read_safetensors(os.path.join(src_dir, "model.safetensors"))
    names = list(tensors)
    weight_map = {}
    total = 0
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        torch_llama.write_safetensors(os.path.join(directory, shard), part)
        weight_map.update({n: shard for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _self_test_written(tmp: str, seed: int) -> List[str]:
    failures = []
    for name, config, dtype, offset, lora in CASES:
        if lora is not None:  # the same base models as plain cases
            continue
        d = os.path.join(tmp, f"written_{name}")
        torch_llama.save_hf_dir(d, config, init_weights(config, seed + offset), dtype)
        try:
            check_written_model(d)
        except (ValueError, FileNotFoundError) as e:
            failures.append(f"check_written_model rejected a good {name} directory: {e}")
    good = os.path.join(tmp, "written_llama_gqa")
    sharded = os.path.join(tmp, "written_sharded")
    _write_sharded(sharded, good, 3)
    try:
        check_written_model(sharded)
    except (ValueError, FileNotFoundError) as e:
        failures.append(f"check_written_model rejected a good sharded directory: {e}")

    base = torch_llama.read_safetensors(os.path.join(good, "model.safetensors"))
    broken = {
        "missing tensor": {n: t for n, t in base.items() if n != "model.norm.weight"},
        "unexpected tensor": {**base, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)},
        "wrong shape": {**base, "model.layers.1.mlp.up_proj.weight": torch.zeros(64, 96)},
    }
    for what, tensors in broken.items():
        d = os.path.join(tmp, "written_broken")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        shutil.copy(os.path.join(good, "config.json"), d)
        torch_llama.write_safetensors(os.path.join(d, "model.safetensors"), tensors)
        try:
            check_written_model(d)
            failures.append(f"check_written_model accepted a directory with a {what}")
        except ValueError:
            pass
    # A shard holding a tensor the index places elsewhere.
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    moved = next(iter(index["weight_map"]))
    index["weight_map"][moved] = "model-00002-of-00003.safetensors" \
        if index["weight_map"][moved] != "model-00002-of-00003.safetensors" else "model-00001-of-00003.safetensors"
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    try:
        check_written_model(sharded)
        failures.append("check_written_model accepted an index that disagrees with its shards")
    except ValueError:
        pass
    return failures


def _self_test_fake_flotilla(tmp: str, seed: int) -> List[str]:
    """The comparison against a float32 torch stand-in: passes when correct, fails on
    every known bug for the cases that bug applies to."""
    failures = []
    fake = os.path.join(tmp, "fake_flotilla")
    with open(fake, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.join(HERE, "fake_flotilla.py")}" "$@"\n')
    os.chmod(fake, os.stat(fake).st_mode | stat.S_IXUSR)

    os.environ.pop("FAKE_FLOTILLA_BUG", None)
    print("-- fake flotilla, correct float32 torch: every case must pass")
    if not run_all(fake, seed, None, keep=False):
        failures.append("the correct float32 stand-in did not pass")
    print("-- fake flotilla with known bugs: every applicable case must fail")
    bugs = [(b, i) for i, case in enumerate(CASES) for b in case_mutations(case)]
    bugs += [("drop_grad", 0), ("count_ignored", 0)]
    # Gradient-only LoRA bugs (the logits are right) and a base that is not frozen.
    for i, case in enumerate(CASES):
        if case.lora is not None:
            bugs += [("lora_dA_unscaled", i), ("lora_backward_stops_early", i), ("base_grads", i)]
    workdir = os.path.join(tmp, "bugs")
    for bug, i in bugs:
        os.environ["FAKE_FLOTILLA_BUG"] = bug
        case_failures = run_case(i, fake, seed, workdir, verbose=False)
        caught = bool(case_failures)
        first = case_failures[0] if case_failures else "passed"
        print(f"  {bug:<25} on {CASES[i][0]:<18} {'caught' if caught else 'NOT CAUGHT'}: {first}")
        if not caught:
            failures.append(f"bug {bug} on case {CASES[i][0]} was not caught")
    os.environ.pop("FAKE_FLOTILLA_BUG", None)

    missing = run_flotilla(os.path.join(tmp, "no_such_binary"), tmp, tmp, os.path.join(tmp, "x"))
    print(f"  missing binary -> {missing}")
    if not (missing or "").startswith("flotilla grads failed:"):
        failures.append("a missing binary did not give 'flotilla grads failed'")
    return failures


def self_test(seed: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="flotilla_reference_selftest_") as tmp:
        failures = []
        for what, fn in (("safetensors", lambda: _self_test_safetensors(tmp)),
                         ("check_written_model", lambda: _self_test_written(tmp, seed)),
                         ("comparison harness", lambda: _self_test_fake_flotilla(tmp, seed))):
            print(f"== self-test: {what}")
            f = fn()
            for line in f:
                print(f"  FAIL {line}")
            print(f"  {what}: {'FAIL' if f else 'pass'}")
            failures += f
    print(f"self-test: {'FAIL' if failures else 'pass'} (seed {seed})")
    return not failures


# ----------------------------------------------------------------------------- main


def main() -> int:
    torch.set_num_threads(2)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("flotilla", nargs="?", help="path to the flotilla binary (default: $FLOTILLA_BIN)")
    ap.add_argument("--seed", type=int, help="base seed (default: fresh, printed)")
    ap.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c[0] for c in CASES)}")
    ap.add_argument("--keep", action="store_true", help="keep the temporary case directories")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bf16"],
                    help="flotilla grads --dtype; bf16 is compared with TOLERANCE_BF16")
    ap.add_argument("--check-written", metavar="DIR", help="check a model directory flotilla wrote")
    ap.add_argument("--self-test", action="store_true", help="test this checker without flotilla")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 1_000_000
    print(f"seed {seed}  (torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')})")

    if args.check_written:
        try:
            summary = check_written_model(args.check_written, seed)
        except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
            print(f"check-written: FAIL: {e}")
            return 1
        print(f"check-written: pass: {json.dumps(summary)}")
        return 0
    if args.self_test:
        return 0 if self_test(seed) else 1

    binary = args.flotilla or os.environ.get("FLOTILLA_BIN")
    if not binary:
        print("error: give the flotilla binary as the first argument or in FLOTILLA_BIN")
        return 1
    case_names = args.cases.split(",") if args.cases else None
    if case_names:
        unknown = sorted(set(case_names) - {c[0] for c in CASES})
        if unknown:
            print(f"error: unknown cases {unknown}")
            return 1
    return 0 if run_all(binary, seed, case_names, args.keep, args.dtype) else 1


if __name__ == "__main__":
    sys.exit(main())
