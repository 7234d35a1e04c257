// Random models and token streams shared by the model tests.
//
// Parameters are of order one instead of Hugging Face's N(0, 0.02): with 0.02 every logit
// is ~0, and a wrong term in a backward, in attention or in a KV cache would change
// results by less than any float tolerance. Norm weights lie away from 1 and biases away
// from 0, so their gradients are not special cases.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "flotilla/base/rng.hpp"
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

}  // namespace flotilla::model::test_models
