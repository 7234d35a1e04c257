"""An independent PyTorch reference for the Llama family (llama, mistral, qwen2) and its
mixtures of experts (mixtral, qwen2_moe).

Written from the architecture of Hugging Face's LlamaForCausalLM, not imported from it
(this machine has no transformers package), so that flotilla's C++ model is checked
against a second implementation rather than against itself. Parameter names, shapes and
the rotary layout are exactly Hugging Face's, so a state dict from here is a
Hugging Face checkpoint and the other way round.

Precision: the model runs in the dtype of its parameters. Norms and the attention
softmax are computed in at least float32 (as Hugging Face does for bf16/f16 models);
with float64 parameters everything, rotary tables included, is float64, which is what
the gradient checks use as an exact reference.

Also here: a small safetensors reader and writer (no safetensors package on this
machine), save_hf_dir(), which writes config.json + model.safetensors, and PEFT's LoRA
(LoraLinear, attach_lora, save_peft_adapter / read_peft_adapter) under PEFT's names.

Vocabulary used below: B batch, T sequence length, C hidden size, NH query heads,
NKV key/value heads, HD head dimension, F intermediate (ffn) size, V vocabulary; for a
mixture of experts E experts, K picked per token.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


# ----------------------------------------------------------------------------- config


def _default(config: dict, key: str, value):
    v = config.get(key)
    return value if v is None else v


class LlamaConfig:
    """The subset of a Hugging Face config.json this model understands.

    Anything that would change the math and is not implemented (attention_bias on
    llama, mlp_bias, a non-silu activation, other rope scalings, Qwen2's sliding
    window) is an error here rather than a silently different model.
    """

    def __init__(self, config: dict):
        self.raw = dict(config)
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ValueError(f"[torch_llama] config lacks {missing}")
        self.model_type = _default(config, "model_type", "llama")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"[torch_llama] model_type {self.model_type!r} not in {MODEL_TYPES}")
        self.hidden_size = int(config["hidden_size"])
        self.intermediate_size = int(config["intermediate_size"])
        self.num_hidden_layers = int(config["num_hidden_layers"])
        self.num_attention_heads = int(config["num_attention_heads"])
        self.num_key_value_heads = int(_default(config, "num_key_value_heads", self.num_attention_heads))
        self.head_dim = int(_default(config, "head_dim", self.hidden_size // self.num_attention_heads))
        self.vocab_size = int(config["vocab_size"])
        mixtral = self.model_type == "mixtral"
        self.rms_norm_eps = float(_default(config, "rms_norm_eps", 1e-5 if mixtral else 1e-6))
        self.rope_theta = float(_default(config, "rope_theta", 1e6 if mixtral else 10000.0))
        self.rope_scaling = config.get("rope_scaling")
        self.tie_word_embeddings = bool(_default(config, "tie_word_embeddings", False))
        self.max_position_embeddings = int(_default(config, "max_position_embeddings", 2048))
        # Qwen2 always has q/k/v biases (and none on o_proj); llama and mistral have none.
        self.qkv_bias = self.model_type == "qwen2" or (self.model_type == "qwen2_moe" and
                                                       bool(_default(config, "qkv_bias", True)))
        self.sliding_window = config.get("sliding_window") if self.model_type in ("mistral", "mixtral") else None
        # Mixture of experts (MixtralConfig / Qwen2MoeConfig fields and defaults).
        self.num_experts = 0
        if mixtral:
            self.num_experts = int(_default(config, "num_local_experts", 8))
            self.top_k = int(_default(config, "num_experts_per_tok", 2))
            self.moe_intermediate_size = self.intermediate_size
            self.shared_expert_intermediate_size = 0
            self.norm_topk_prob = True
            self.decoder_sparse_step, self.mlp_only_layers = 1, []
        elif self.model_type == "qwen2_moe":
            self.num_experts = int(_default(config, "num_experts", 60))
            self.top_k = int(_default(config, "num_experts_per_tok", 4))
            self.moe_intermediate_size = int(_default(config, "moe_intermediate_size", 1408))
            self.shared_expert_intermediate_size = int(_default(config, "shared_expert_intermediate_size", 5632))
            self.norm_topk_prob = bool(_default(config, "norm_topk_prob", False))
            self.decoder_sparse_step = int(_default(config, "decoder_sparse_step", 1))
            self.mlp_only_layers = list(_default(config, "mlp_only_layers", []))
        if self.num_experts:
            self.router_aux_loss_coef = float(_default(config, "router_aux_loss_coef", 0.001))
            self.output_router_logits = bool(_default(config, "output_router_logits", False))

        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError("[torch_llama] num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2 != 0:
            raise ValueError("[torch_llama] head_dim must be even for rotary embeddings")
        if _default(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"[torch_llama] hidden_act {config['hidden_act']!r} not supported (silu only)")
        if self.model_type == "llama" and config.get("attention_bias"):
            raise ValueError("[torch_llama] llama attention_bias=true not supported")
        if config.get("mlp_bias"):
            raise ValueError("[torch_llama] mlp_bias=true not supported")
        if self.model_type in ("qwen2", "qwen2_moe") and config.get("use_sliding_window"):
            raise ValueError("[torch_llama] qwen2 use_sliding_window=true not supported")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type == "default":
                self.rope_scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"[torch_llama] rope_scaling type {rope_type!r} not supported (llama3 only)")

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen2MoeDecoderLayer's rule (every layer of Mixtral)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def to_hf_dict(self, dtype: torch.dtype) -> dict:
        """config.json contents, with the keys transformers needs to pick the class."""
        out = dict(self.raw)
        out.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            hidden_act="silu",
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            torch_dtype=_TORCH_DTYPE_NAMES[dtype],
        )
        out.setdefault("rope_scaling", None)
        if self.model_type == "llama":
            out.setdefault("attention_bias", False)
            out.setdefault("mlp_bias", False)
        return out


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(HD/2,) inverse frequencies, with Llama 3 scaling as transformers'
    _compute_llama3_parameters applies it."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).to(dtype) / hd))
    if cfg.rope_scaling is None:
        return inv_freq
    rs = cfg.rope_scaling
    factor = float(rs["factor"])
    low_freq_factor = float(rs["low_freq_factor"])
    high_freq_factor = float(rs["high_freq_factor"])
    old_context_len = float(rs["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`; short ones kept.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, interpolate smoothly between the two.
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin: (T, HD) in Hugging Face's layout, cat(freqs, freqs).

    Tables are computed in float32 (as transformers does), or float64 for a float64
    model, then cast to the activation dtype."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rope_inv_freq(cfg, table_dtype)
    freqs = positions.to(table_dtype)[:, None] * inv_freq[None, :]  # (T, HD/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, HD)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) with x1 the first half of the last dimension, x2 the second."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, HD); cos, sin: (T, HD)."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        input_dtype = x.dtype
        h = x.to(torch.promote_types(input_dtype, torch.float32))
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        C, NH, NKV, HD = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(C, NH * HD, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, NKV * HD, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, NKV * HD, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(NH * HD, C, bias=False)

    def forward(self, x, cos, sin, mask):
        # x: (B, T, C); cos, sin: (T, HD); mask: (T, T) additive
        cfg = self.cfg
        B, T, _ = x.shape
        NH, NKV, HD = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.q_proj(x).view(B, T, NH, HD).transpose(1, 2)  # (B, NH, T, HD)
        k = self.k_proj(x).view(B, T, NKV, HD).transpose(1, 2)  # (B, NKV, T, HD)
        v = self.v_proj(x).view(B, T, NKV, HD).transpose(1, 2)  # (B, NKV, T, HD)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        group = NH // NKV
        if group > 1:  # HF's repeat_kv: query head h reads kv head h // group
            k = k[:, :, None].expand(B, NKV, group, T, HD).reshape(B, NH, T, HD)
            v = v[:, :, None].expand(B, NKV, group, T, HD).reshape(B, NH, T, HD)
        scores = torch.matmul(q, k.transpose(2, 3)) * (HD ** -0.5) + mask  # (B, NH, T, T)
        probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
        out = torch.matmul(probs, v)  # (B, NH, T, HD)
        out = out.transpose(1, 2).reshape(B, T, NH * HD)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, width: Optional[int] = None):
        super().__init__()
        width = width or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T, C), via (B, T, F)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtralExpert(nn.Module):
    """Mixtral's expert: w1 gate, w3 up, w2 down."""
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.moe_intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.moe_intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.moe_intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    """MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock. Written densely, unlike flotilla's
    gather-and-scatter: every expert runs on every token, and a (tokens, E) matrix of
    combine weights, zero outside each token's top K, mixes their outputs. The router's
    softmax is in float32 at least (as transformers); `router_logits` keeps this forward's
    (tokens, E) logits for the load-balancing loss."""
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        if cfg.model_type == "mixtral":
            self.experts = nn.ModuleList([MixtralExpert(cfg) for _ in range(cfg.num_experts)])
        else:
            self.experts = nn.ModuleList([MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)])
            if cfg.shared_expert_intermediate_size > 0:
                self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.router_logits = None

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        h = x.reshape(B * T, C)
        logits = self.gate(h)  # (N, E)
        self.router_logits = logits
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        top, picked = torch.topk(probs, self.cfg.top_k, dim=-1)  # (N, K)
        if self.cfg.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(1, picked, top).to(h.dtype)  # (N, E)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            out = out + weights[:, e:e + 1] * expert(h)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out.reshape(B, T, C)


def load_balancing_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func without an attention mask: over the logits
    of all MoE layers concatenated, E * sum_e (fraction of top-k picks of e) * (mean prob of e)."""
    logits = torch.cat(router_logits, dim=0)  # (layers * N, E)
    probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    _, picked = torch.topk(probs, top_k, dim=-1)
    mask = F.one_hot(picked, num_experts).to(probs.dtype)  # (rows, K, E)
    tokens_per_expert = mask.mean(dim=0)  # (K, E)
    prob_per_expert = probs.mean(dim=0)  # (E)
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * num_experts


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.is_moe_layer(layer):
            self.mlp = MLP(cfg)
        elif cfg.model_type == "mixtral":
            self.block_sparse_moe = SparseMoe(cfg)
        else:
            self.mlp = SparseMoe(cfg)

    def moe(self) -> Optional[SparseMoe]:
        m = getattr(self, "block_sparse_moe", None) or self.mlp
        return m if isinstance(m, SparseMoe) else None

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        ffn = getattr(self, "block_sparse_moe", None) or self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(tokens (B, T) int64, targets (B, T) or None) -> (logits (B, T, V), loss).

    Targets are already aligned with positions (no internal shift, unlike
    transformers' labels); positions with target -100 are ignored and the loss is the
    mean cross entropy over the rest. With tie_word_embeddings there is no lm_head
    parameter: the output projection is model.embed_tokens.weight. A mixture of experts
    keeps the forward's load-balancing loss in `aux_loss` (the returned loss is the token
    loss alone; transformers adds router_aux_loss_coef * aux_loss to it when
    output_router_logits is set).
    """

    def __init__(self, config):
        super().__init__()
        self.cfg = config if isinstance(config, LlamaConfig) else LlamaConfig(config)
        self.model = LlamaModel(self.cfg)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False)
        self._mask_cache: Dict[tuple, torch.Tensor] = {}

    def causal_mask(self, T: int, dtype: torch.dtype) -> torch.Tensor:
        """(T, T) additive mask: 0 where key j may be seen from query i, else dtype min."""
        key = (T, dtype)
        if key not in self._mask_cache:
            i = torch.arange(T)[:, None]
            j = torch.arange(T)[None, :]
            allowed = j <= i
            if self.cfg.sliding_window is not None:
                allowed &= (i - j) < int(self.cfg.sliding_window)
            mask = torch.zeros(T, T, dtype=dtype)
            self._mask_cache[key] = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return self._mask_cache[key]

    def output_weight(self) -> torch.Tensor:  # (V, C)
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None):
        B, T = tokens.shape
        h = self.model.embed_tokens(tokens)  # (B, T, C)
        cos, sin = rope_cos_sin(self.cfg, torch.arange(T), h.dtype)
        mask = self.causal_mask(T, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        h = self.model.norm(h)
        self.aux_loss = None
        router_logits = [m.router_logits for m in (layer.moe() for layer in self.model.layers) if m is not None]
        if router_logits:
            self.aux_loss = load_balancing_loss(router_logits, self.cfg.num_experts, self.cfg.top_k)
        logits = F.linear(h, self.output_weight())  # (B, T, V)
        loss = None
        if targets is not None:
            flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(B * T, -1)
            loss = F.cross_entropy(flat, targets.reshape(B * T), ignore_index=IGNORE_INDEX)
        return logits, loss

    def hf_state_dict(self) -> Dict[str, torch.Tensor]:
        """Exactly the tensors a Hugging Face checkpoint of this model holds."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def load_hf_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Copies tensors in by name; names and shapes must match exactly."""
        expected = dict(self.named_parameters())
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        bad_shape = [
            f"{n}: file {tuple(tensors[n].shape)} vs model {tuple(p.shape)}"
            for n, p in expected.items()
            if n in tensors and tuple(tensors[n].shape) != tuple(p.shape)
        ]
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        if bad_shape:
            problems.append(f"shape mismatch {bad_shape}")
        if problems:
            raise ValueError("[torch_llama] state dict does not fit the config: " + "; ".join(problems))
        with torch.no_grad():
            for n, p in expected.items():
                p.copy_(tensors[n].to(p.dtype))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- safetensors

# safetensors dtype name -> (little-endian numpy dtype used for the raw bytes, torch dtype)
_ST_DTYPES = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<i2"), torch.bfloat16),  # read as int16 bits, then viewed as bf16
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("u1"), torch.bool),
}
_TORCH_TO_ST = {torch_dt: name for name, (_, torch_dt) in _ST_DTYPES.items()}
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                      torch.float64: "float64"}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    if t.dtype == torch.bool:
        return t.to(torch.uint8).numpy().tobytes()
    np_dtype = _ST_DTYPES[_TORCH_TO_ST[t.dtype]][0]
    return t.numpy().astype(np_dtype, copy=False).tobytes()


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Writes tensors (in their own dtypes) as one safetensors file, via a temp name."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _TORCH_TO_ST:
            raise ValueError(f"[safetensors] {name}: dtype {t.dtype} not supported")
        blob = _tensor_bytes(t)
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in header")
        out[k] = v
    return out


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """name -> tensor (in the file's dtype). Validates the file as strictly as the
    safetensors library does: the header parses, every tensor's byte range matches its
    dtype and shape, and the ranges tile the data region exactly, without gaps."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"[safetensors] {path}: file of {size} bytes is too short")
        (n_header,) = struct.unpack("<Q", f.read(8))
        if n_header > _MAX_HEADER_BYTES or 8 + n_header > size:
            raise ValueError(f"[safetensors] {path}: header length {n_header} does not fit a {size}-byte file")
        raw = f.read(n_header)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"[safetensors] {path}: bad header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"[safetensors] {path}: header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + n_header
        data_len = size - data_start

        entries = []
        for name, info in header.items():
            try:
                dtype_name = info["dtype"]
                shape = [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"[safetensors] {path}: {name}: malformed entry {info!r}") from None
            if dtype_name not in _ST_DTYPES:
                raise ValueError(f"[safetensors] {path}: {name}: dtype {dtype_name!r} not supported")
            if any(s < 0 for s in shape):
                raise ValueError(f"[safetensors] {path}: {name}: negative dimension in {shape}")
            np_dtype, _ = _ST_DTYPES[dtype_name]
            numel = math.prod(shape)
            if end - begin != numel * np_dtype.itemsize or begin < 0:
                raise ValueError(f"[safetensors] {path}: {name}: offsets [{begin}, {end}] do not hold "
                                 f"{dtype_name}{shape}")
            entries.append((begin, end, name, dtype_name, shape))
        entries.sort()
        cursor = 0
        for begin, end, name, _, _ in entries:
            if begin != cursor:
                raise ValueError(f"[safetensors] {path}: {name}: data starts at {begin}, expected {cursor}")
            cursor = end
        if cursor != data_len:
            raise ValueError(f"[safetensors] {path}: tensors cover {cursor} bytes of a {data_len}-byte data region")

        out: Dict[str, torch.Tensor] = {}
        if not entries:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for begin, end, name, dtype_name, shape in sorted(entries, key=lambda e: e[2]):
                np_dtype, torch_dtype = _ST_DTYPES[dtype_name]
                arr = np.frombuffer(mm, dtype=np_dtype, count=math.prod(shape), offset=data_start + begin)
                t = torch.from_numpy(arr.astype(np_dtype.newbyteorder("="), copy=True)).reshape(shape)
                if dtype_name == "BF16":
                    t = t.view(torch.bfloat16)
                elif dtype_name == "BOOL":
                    t = t.to(torch.bool)
                out[name] = t
                del arr
        return out


# ----------------------------------------------------------------------------- HF dirs


def save_hf_dir(directory: str, config: dict, state_dict: Dict[str, torch.Tensor],
                dtype: torch.dtype = torch.float32) -> None:
    """Writes config.json + model.safetensors with every tensor in `dtype`
    (float32, float16 or bfloat16). lm_head.weight is left out when tied."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"[torch_llama] save dtype {dtype} not supported (F32, F16, BF16)")
    cfg = LlamaConfig(config)
    os.makedirs(directory, exist_ok=True)
    tensors = {n: t.detach().to(dtype) for n, t in state_dict.items()
               if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(dtype), f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})


def read_hf_weights(directory: str) -> Dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: model.safetensors, or the shards named
    by model.safetensors.index.json (each shard must hold exactly what the index says)."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"[torch_llama] {index_path}: no weight_map")
        shards: Dict[str, set] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, set()).add(name)
        out: Dict[str, torch.Tensor] = {}
        for shard, names in sorted(shards.items()):
            tensors = read_safetensors(os.path.join(directory, shard))
            if set(tensors) != names:
                raise ValueError(f"[torch_llama] {shard}: holds {sorted(set(tensors) - names)} not in the index, "
                                 f"lacks {sorted(names - set(tensors))} that the index places there")
            out.update(tensors)
        return out
    if os.path.exists(single_path):
        return read_safetensors(single_path)
    raise FileNotFoundError(f"[torch_llama] {directory}: neither model.safetensors nor "
                            f"model.safetensors.index.json")


def load_hf_dir(directory: str, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    model = LlamaForCausalLM(config).to(dtype)
    model.load_hf_state_dict(read_hf_weights(directory))
    return model


# ----------------------------------------------------------------------------- LoRA

# PEFT's LoRA (Hu et al. 2021) on the model above. An adapted linear layer computes
#     y = x W^T + b + scale * (dropout(x) A^T) B^T,   scale = lora_alpha / r,
# with A (r, in) and B (out, r). Adapter tensors are named as PEFT saves them for a
# LlamaForCausalLM: "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight".
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


def lora_module_path(layer: int, target: str) -> str:
    """model.layers.{i}.self_attn.q_proj (or .mlp.gate_proj): the module PEFT adapts."""
    block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def lora_tensor_name(layer: int, target: str, which: str) -> str:
    """PEFT's name of lora_A or lora_B (which = "A" or "B") of one adapted layer."""
    return f"{PEFT_PREFIX}{lora_module_path(layer, target)}.lora_{which}.weight"


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus scale * (dropout(x) A^T) B^T.

    Keeps the base layer's parameters under their own names ("weight", "bias"), so the
    model's named_parameters() stay Hugging Face's. A and B are whatever tensors the caller
    gives (leaves, nn.Parameters, or differentiable functions of leaves) and are held in a
    tuple, not registered: the caller owns them and their gradients."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 dropout: float = 0.0):
        super().__init__()
        out_features, in_features = base.weight.shape
        r = lora_a.shape[0]
        if tuple(lora_a.shape) != (r, in_features) or tuple(lora_b.shape) != (out_features, r):
            raise ValueError(f"[torch_llama] LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
                             f"do not fit a linear layer (out {out_features}, in {in_features}) at rank {r}")
        self.weight = base.weight
        self.bias = base.bias
        self.lora = (lora_a, lora_b)
        self.scale = float(scale)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        lora_a, lora_b = self.lora
        xd = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x  # PEFT: Identity at 0
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(xd, lora_a), lora_b)


def attach_lora(model: LlamaForCausalLM, tensors: Dict[str, torch.Tensor], scale: float,
                dropout: float = 0.0) -> None:
    """Replaces every linear layer that `tensors` (PEFT names, lora_A and lora_B) adapts by
    a LoraLinear over the same base weights. Raises ValueError for a name that is not a
    LoRA tensor of this model, an A without its B, or a misshapen tensor."""
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        for which in ("A", "B"):
            suffix = f".lora_{which}.weight"
            if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
                pairs.setdefault(name[len(PEFT_PREFIX):-len(suffix)], {})[which] = t
                break
        else:
            raise ValueError(f"[torch_llama] {name!r} is not a PEFT LoRA tensor name")
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"[torch_llama] {path}: LoRA needs both lora_A and lora_B, got {sorted(pair)}")
        parent_path, _, child = path.rpartition(".")
        if child not in LORA_TARGETS:
            raise ValueError(f"[torch_llama] {path}: not a LoRA target ({', '.join(LORA_TARGETS)})")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            raise ValueError(f"[torch_llama] {path}: no such module in this model") from None
        base = getattr(parent, child)
        if isinstance(base, LoraLinear):
            raise ValueError(f"[torch_llama] {path}: already adapted")
        setattr(parent, child, LoraLinear(base, pair["A"], pair["B"], scale, dropout))


def save_peft_adapter(directory: str, tensors: Dict[str, torch.Tensor], r: int, lora_alpha: float,
                      target_modules, layers_to_transform=None, lora_dropout: float = 0.0,
                      dtype: torch.dtype = torch.float32) -> None:
    """adapter_config.json + adapter_model.safetensors as PEFT writes them for LoRA.
    layers_to_transform None adapts every layer; a list names the layers (with
    layers_pattern "layers", as PEFT needs for Llama)."""
    os.makedirs(directory, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": list(target_modules),
        "layers_to_transform": None if layers_to_transform is None else list(layers_to_transform),
        "layers_pattern": None if layers_to_transform is None else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(directory, "adapter_model.safetensors"),
                      {n: t.detach().to(dtype) for n, t in tensors.items()}, {"format": "pt"})


def read_peft_adapter(directory: str):
    """(adapter_config.json as a dict, PEFT-named tensors) of a LoRA adapter directory."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"[torch_llama] {directory}: peft_type {config.get('peft_type')!r} is not LORA")
    return config, read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
