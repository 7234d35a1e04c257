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
  gate_.resize(N * static_cast<size_t>(cfg.ffn_dim));
  up_.resize(N * static_cast<size_t>(cfg.ffn_dim));
  probs_.resize(static_cast<size_t>(cfg.n_heads) * N * static_cast<size_t>(max_tokens_));
  rope_cos_.resize(N * static_cast<size_t>(cfg.head_dim / 2));
  rope_sin_.resize(N * static_cast<size_t>(cfg.head_dim / 2));
  rstd_.resize(N);
  if (adapters_) lora_u_.resize(N * static_cast<size_t>(adapters_->config().rank));
  capacity_ = n;
}

void Decoder::lora(int64_t layer, LoraTarget t, float* out, const float* x, int64_t n) {
  if (!adapters_) return;
  const LoraSlot& s = adapters_->slot(layer, t);
  if (!s.active()) return;
  const int64_t r = adapters_->config().rank;
  const float* w = adapters_->params().data();
  k::matmul_forward(lora_u_.data(), x, w + s.a, nullptr, n, s.in, r);
  k::matmul_accumulate(out, lora_u_.data(), w + s.b, n, r, s.out, adapters_->config().scale());
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
  const int64_t C = cfg.dim, F = cfg.ffn_dim, V = cfg.vocab_size, Dq = cfg.q_dim(), Dkv = cfg.kv_dim();
  const int64_t NH = cfg.n_heads, NKV = cfg.n_kv_heads, hd = cfg.head_dim;
  const int64_t Tk = length_ + n;
  const float* w = model_.params().data();
  auto bias = [&](int64_t off) { return off >= 0 ? w + off : nullptr; };

  k::rope_table(rope_cos_.data(), rope_sin_.data(), inv_freq_.data(), length_, n, hd);
  float* x = x_.data();
  model_.embedding_forward(x, tokens.data(), n);
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const LayerParams& lp = layout.layers[static_cast<size_t>(l)];
    float* kc = k_cache_.data() + l * max_tokens_ * Dkv;  // (max_tokens, NKV, hd)
    float* vc = v_cache_.data() + l * max_tokens_ * Dkv;
    float* k_new = kc + length_ * Dkv;
    float* v_new = vc + length_ * Dkv;
    k::rmsnorm_forward(ln_.data(), rstd_.data(), x, w + lp.ln1, n, C, cfg.rms_norm_eps);
    model_.linear_forward(q_.data(), ln_.data(), lp.wq, bias(lp.bq), n, C, Dq);
    model_.linear_forward(k_new, ln_.data(), lp.wk, bias(lp.bk), n, C, Dkv);
    model_.linear_forward(v_new, ln_.data(), lp.wv, bias(lp.bv), n, C, Dkv);
    lora(l, LoraTarget::q, q_.data(), ln_.data(), n);
    lora(l, LoraTarget::k, k_new, ln_.data(), n);
    lora(l, LoraTarget::v, v_new, ln_.data(), n);
    k::rope_forward(q_.data(), rope_cos_.data(), rope_sin_.data(), 1, n, NH, hd);
    k::rope_forward(k_new, rope_cos_.data(), rope_sin_.data(), 1, n, NKV, hd);
    k::attention_forward(attn_.data(), probs_.data(), q_.data(), kc, vc, 1, n, Tk, NH, NKV, hd);
    // x += o_proj(attn); ln_ is free as the o_proj output.
    model_.linear_forward(ln_.data(), attn_.data(), lp.wo, nullptr, n, Dq, C);
    lora(l, LoraTarget::o, ln_.data(), attn_.data(), n);
    k::add_inplace(x, ln_.data(), n * C);
    k::rmsnorm_forward(ln_.data(), rstd_.data(), x, w + lp.ln2, n, C, cfg.rms_norm_eps);
    model_.linear_forward(gate_.data(), ln_.data(), lp.wgate, nullptr, n, C, F);
    model_.linear_forward(up_.data(), ln_.data(), lp.wup, nullptr, n, C, F);
    lora(l, LoraTarget::gate, gate_.data(), ln_.data(), n);
    lora(l, LoraTarget::up, up_.data(), ln_.data(), n);
    k::swiglu_forward(gate_.data(), gate_.data(), up_.data(), n, F);
    model_.linear_forward(ln_.data(), gate_.data(), lp.wdown, nullptr, n, F, C);
    lora(l, LoraTarget::down, ln_.data(), gate_.data(), n);
    k::add_inplace(x, ln_.data(), n * C);
  }
  // Only the last position's logits are needed.
  const float* x_last = x + (n - 1) * C;
  k::rmsnorm_forward(ln_.data(), rstd_.data(), x_last, w + layout.final_norm, 1, C, cfg.rms_norm_eps);
  model_.linear_forward(logits_.data(), ln_.data(), layout.lm_head, nullptr, 1, C, V);
  length_ = Tk;
  return logits_.span();
}

}  // namespace flotilla::model
