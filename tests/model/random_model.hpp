// Random models, token streams and small mixture-of-experts shapes shared by the model
// and parallel tests.
//
// Parameters are of order one instead of Hugging Face's N(0, 0.02): with 0.02 every logit
// is ~0, and a wrong term in a backward, in attention or in a KV cache would change
// results by less than any float tolerance. Norm weights lie away from 1 and biases away
// from 0, so their gradients are not special cases.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::model::test_models {

// Half-widths of the uniform draws: norm weights are always U(0.5, 1.5).
struct OrderOne {
  float weight = 0.5f;     // matrices
  float embedding = 1.0f;  // model.embed_tokens.weight
  float bias = 0.3f;       // *.bias
};

inline void fill_order_one(Llama& model, Rng& rng, OrderOne r = {}) {
  std::span<float> all = model.params();
  for (const ParamInfo& info : model.layout().params()) {
    std::span<float> w = all.subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel));
    if (info.name.ends_with("norm.weight"))
      rng.fill_uniform(w, 0.5f, 1.5f);
    else if (info.name.ends_with(".bias"))
      rng.fill_uniform(w, -r.bias, r.bias);
    else if (info.name == "model.embed_tokens.weight")
      rng.fill_uniform(w, -r.embedding, r.embedding);
    else
      rng.fill_uniform(w, -r.weight, r.weight);
  }
}

inline Llama random_model(const ModelConfig& cfg, Rng& rng, OrderOne r = {}) {
  Llama model(cfg);
  fill_order_one(model, rng, r);
  return model;
}

// n token ids drawn uniformly from [0, vocab).
inline std::vector<int32_t> random_tokens(Rng& rng, int64_t n, int64_t vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  return t;
}

// The central difference of `loss()` in `x` ((loss(x + eps) - loss(x - eps)) over the
// floats' actual distance; `x` put back after), or nullopt when `loss` set `flipped` (a
// mixture-of-experts top-k choice changed under the perturbation: the loss jumps).
template <class Loss>
std::optional<double> central_difference(float& x, double eps, bool& flipped, Loss&& loss) {
  const float x0 = x;
  const float xp = x0 + static_cast<float>(eps), xm = x0 - static_cast<float>(eps);
  flipped = false;
  x = xp;
  const double lp = loss();
  x = xm;
  const double lm = loss();
  x = x0;
  if (flipped) return std::nullopt;
  return (lp - lm) / (static_cast<double>(xp) - static_cast<double>(xm));
}

// A batch of B x T tokens, redrawn (at most 1000 times) until every MoE layer's top-k choice
// of every token has a margin (k-th minus (k+1)-th router probability) of at least
// `min_margin`: a choice close to a tie flips under the small perturbations of a finite
// difference, and the loss jumps. nullopt when no draw is clear.
inline std::optional<std::vector<int32_t>> tokens_clear_of_ties(Llama& model, Rng& rng, int64_t B, int64_t T,
                                                                float min_margin = 1e-2f) {
  const ModelConfig& cfg = model.config();
  for (int draw = 0; draw < 1000; ++draw) {
    std::vector<int32_t> tokens = random_tokens(rng, B * T, cfg.vocab_size);
    model.forward(tokens.data(), nullptr, B, T);
    float margin = 1.0f;
    for (int64_t l = 0; l < cfg.n_layers; ++l) {
      if (!cfg.moe_layer(l)) continue;
      const auto p = model.router_probs(l);
      const int64_t E = cfg.moe.num_experts, K = cfg.moe.top_k;
      for (int64_t n = 0; n < B * T; ++n) {
        std::vector<float> row(p.begin() + n * E, p.begin() + (n + 1) * E);
        std::sort(row.rbegin(), row.rend());
        margin = std::min(margin, row[static_cast<size_t>(K - 1)] - row[static_cast<size_t>(K)]);
      }
    }
    if (margin >= min_margin) return tokens;
  }
  return std::nullopt;
}

// Small enough that a forward costs microseconds, with every feature a backward must
// handle: qwen2 (q/k/v biases), GQA (4 query heads share 2 kv heads), an odd vocabulary.
inline ModelConfig tiny_qwen2(int64_t n_layers = 2, bool tied = false) {
  ModelConfig c;
  c.arch = Architecture::qwen2;
  c.qkv_bias = true;
  c.vocab_size = 37;
  c.dim = 16;
  c.n_layers = n_layers;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.ffn_dim = 24;
  c.max_position = 64;
  c.tie_embeddings = tied;
  return c;
}

// Tiny mixtral- and qwen2_moe-shaped models: GQA, 2 layers, 4 experts, top 2 (mixtral:
// every layer a mixture, renormalised; qwen2_moe: layer 0 dense by mlp_only_layers, layer 1
// sparse with a shared expert, not renormalised), the aux loss in the training loss with a
// large coefficient so that its gradient is visible.
inline ModelConfig tiny_moe(Architecture arch) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 29;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.ffn_dim = 24;
  c.max_position = 64;
  c.moe.num_experts = 4;
  c.moe.top_k = 2;
  c.moe.router_aux_loss_coef = 0.5f;
  c.moe.output_router_logits = true;
  if (arch == Architecture::mixtral) {
    c.moe.expert_ffn_dim = c.ffn_dim;
    c.moe.norm_topk_prob = true;
  } else {
    c.qkv_bias = true;
    c.moe.expert_ffn_dim = 12;
    c.moe.shared_expert_ffn_dim = 20;
    c.moe.norm_topk_prob = false;
    c.moe.mlp_only_layers = {0};
  }
  return c;
}

}  // namespace flotilla::model::test_models
