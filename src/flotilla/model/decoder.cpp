#include "flotilla/model/decoder.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "flotilla/base/error.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::model {
namespace k = flotilla::kernels;

Decoder::Decoder(const Llama& model, int64_t max_tokens, const LoraAdapters* adapters)
    : model_(model), adapters_(adapters), max_tokens_(max_tokens) {
  const ModelConfig& cfg = model.config();
  if (max_tokens <= 0) throw InputError("model/decoder", "max_tokens must be positive");
  const auto cache = static_cast<size_t>(cfg.n_layers * max_tokens * cfg.kv_dim());
  k_cache_.resize(cache);
  v_cache_.resize(cache);
  inv_freq_.resize(static_cast<size_t>(cfg.head_dim / 2));
  k::rope_inv_freq(inv_freq_.data(), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling);
  logits_.resize(static_cast<size_t>(cfg.vocab_size));
}

void Decoder::reserve(int64_t n) {
  if (n <= capacity_) return;
  const ModelConfig& cfg = model_.config();
  const auto N = static_cast<size_t>(n);
  x_.resize(N * static_cast<size_t>(cfg.dim));
  ln_.resize(N * static_cast<size_t>(cfg.dim));
  q_.resize(N * static_cast<size_t>(cfg.q_dim()));
  attn_.resize(N * static_cast<size_t>(cfg.q_dim()));
  resid_mid_.resize(N * static_cast<size_t>(cfg.dim));
  int64_t dense = 0;  // the widest dense MLP (or shared expert)
  for (int64_t l = 0; l < cfg.n_layers; ++l) dense = std::max(dense, cfg.dense_mlp_dim(l));
  const auto E = static_cast<size_t>(cfg.moe.num_experts), K = static_cast<size_t>(cfg.moe.top_k);
  const auto Fe = static_cast<size_t>(cfg.moe.expert_ffn_dim), C = static_cast<size_t>(cfg.dim);
  gate_.resize(N * static_cast<size_t>(dense));
  up_.resize(N * static_cast<size_t>(dense));
  act_.resize(N * std::max(static_cast<size_t>(dense), K * Fe));
  if (cfg.is_moe()) {
    router_probs_.resize(N * E);
    expert_gate_.resize(N * K * Fe);
    expert_up_.resize(N * K * Fe);
    expert_out_.resize(N * K * C);
    moe_rows_.resize(N * K * C);
    shared_out_.resize(N * C);
    shared_gate_.resize(N);
  }
  probs_.resize(static_cast<size_t>(cfg.n_heads) * N * static_cast<size_t>(max_tokens_));
  rope_cos_.resize(N * static_cast<size_t>(cfg.head_dim / 2));
  rope_sin_.resize(N * static_cast<size_t>(cfg.head_dim / 2));
  rstd_.resize(N);
  if (adapters_) lora_u_.resize(N * static_cast<size_t>(adapters_->config().rank));
  capacity_ = n;
}

std::span<const float> Decoder::step(std::span<const int32_t> tokens) {
  const ModelConfig& cfg = model_.config();
  const ParamLayout& layout = model_.layout();
  const auto n = static_cast<int64_t>(tokens.size());
  if (n == 0) throw InputError("model/decoder", "step with no tokens");
  if (length_ + n > max_tokens_)
    throw InputError("model/decoder", fmt::format("context full: {} + {} tokens exceed the limit of {}",
                                                  length_, n, max_tokens_));
  for (int32_t t : tokens)
    if (t < 0 || t >= cfg.vocab_size)
      throw InputError("model/decoder", fmt::format("token id {} is outside the vocabulary [0, {})", t,
                                                    cfg.vocab_size));
  reserve(n);
  const int64_t C = cfg.dim, V = cfg.vocab_size, Dkv = cfg.kv_dim(), hd = cfg.head_dim;
  const int64_t Tk = length_ + n;

  k::rope_table(rope_cos_.data(), rope_sin_.data(), inv_freq_.data(), length_, n, hd);
  float* x = x_.data();
  model_.embedding_forward(x, tokens.data(), n);
  // The new positions are the queries; they attend over the whole cache, their own keys
  // and values included; no dropout at inference.
  BlockContext ctx;
  ctx.B = 1;
  ctx.T = n;
  ctx.Tk = Tk;
  ctx.rope_cos = rope_cos_.data();
  ctx.rope_sin = rope_sin_.data();
  ctx.ln = ln_.data();
  ctx.act = act_.data();
  ctx.moe_rows = moe_rows_.data();
  ctx.lora = adapters_;
  LayerActivations la;
  la.resid_in = x;
  la.ln1_rstd = la.ln2_rstd = rstd_.data();
  la.q = q_.data();
  la.probs = probs_.data();
  la.attn_out = attn_.data();
  la.resid_mid = resid_mid_.data();
  la.gate = gate_.data();
  la.up = up_.data();
  la.router_probs = router_probs_.data();
  la.expert_gate = expert_gate_.data();
  la.expert_up = expert_up_.data();
  la.expert_out = expert_out_.data();
  la.shared_out = shared_out_.data();
  la.shared_gate = shared_gate_.data();
  la.lora_u.fill(lora_u_.data());
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    float* kc = k_cache_.data() + l * max_tokens_ * Dkv;  // (max_tokens, NKV, hd)
    float* vc = v_cache_.data() + l * max_tokens_ * Dkv;
    la.k = kc + length_ * Dkv;
    la.v = vc + length_ * Dkv;
    ctx.keys = kc;
    ctx.values = vc;
    model_.block_forward(l, la, x, ctx);
  }
  // Only the last position's logits are needed.
  const float* x_last = x + (n - 1) * C;
  k::rmsnorm_forward(ln_.data(), rstd_.data(), x_last, model_.dense_weight(layout.final_norm), 1, C, cfg.rms_norm_eps);
  model_.linear_forward(logits_.data(), ln_.data(), layout.lm_head, nullptr, 1, C, V);
  length_ = Tk;
  return logits_.span();
}

}  // namespace flotilla::model
