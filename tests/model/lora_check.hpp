// Shared by the LoRA tests over float and quantized bases: adapters on every target with
// nonzero B, and the check of their gradients against central finite differences.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"

namespace flotilla::model::lora_check {

// Rank 3, alpha 6 on q,k,v,o,gate,up,down of the last `num_layers` layers.
inline LoraConfig all_targets(int64_t num_layers, float dropout = 0.0f) {
  LoraConfig c;
  c.rank = 3;
  c.alpha = 6.0f;
  c.dropout = dropout;
  c.targets = LoraConfig::parse_targets("q,k,v,o,gate,up,down");
  c.num_layers = num_layers;
  return c;
}

// B starts at zero (so dA would be zero): give it values to test every path.
inline void randomize(LoraAdapters& lora, uint64_t seed) {
  lora.init_random(seed);
  Rng rng(seed + 1);
  for (const ParamInfo& info : lora.table().params())
    if (info.name.find("lora_B") != std::string::npos)
      rng.fill_uniform(lora.params().subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel)), -0.5f,
                       0.5f);
}

// `model` with `lora` attached: the adapters' gradient of the mean loss on (tokens,
// targets) against central differences at `samples` random elements of every adapter
// tensor, `before_forward` called ahead of every forward (a dropout step, say). Returns how
// many were checked.
// Central differences in float32 with eps 1e-2: the loss is O(1) and smooth, so the
// truncation error is ~1e-5 and float rounding of the loss (~1e-7 relative) divided by
// 2 eps is ~1e-5; a wrong or missing term is O(|grad|).
inline int expect_grads_match_finite_differences(Llama& model, LoraAdapters& lora, const std::vector<int32_t>& tokens,
                                                 const std::vector<int32_t>& targets, int64_t B, int64_t T, Rng& rng,
                                                 int samples = 3,
                                                 const std::function<void()>& before_forward = [] {}) {
  auto mean_loss = [&] {
    before_forward();
    const LossSum l = model.forward(tokens.data(), targets.data(), B, T);
    return l.sum / static_cast<double>(l.num_tokens);
  };
  model.zero_grads();
  before_forward();
  const LossSum l = model.forward(tokens.data(), targets.data(), B, T);
  model.backward(1.0f / static_cast<float>(l.num_tokens));
  const std::vector<float> analytic(lora.grads().begin(), lora.grads().end());
  std::span<float> w = lora.params();
  int checked = 0;
  for (const ParamInfo& info : lora.table().params()) {
    for (int k = 0; k < samples; ++k) {
      const auto i = static_cast<size_t>(info.offset + static_cast<int64_t>(rng.below(static_cast<uint64_t>(info.numel))));
      const float w0 = w[i];
      w[i] = w0 + 1e-2f;
      const double lp = mean_loss();
      w[i] = w0 - 1e-2f;
      const double lm = mean_loss();
      w[i] = w0;
      const double numeric = (lp - lm) / 2e-2;
      EXPECT_NEAR(analytic[i], numeric, 2e-3 + 2e-2 * std::fabs(numeric)) << info.name << " element " << i;
      ++checked;
    }
  }
  return checked;
}

// grads_of(checkpoint): the adapters' gradients of one run with gradient checkpointing on
// or off. Recomputing the blocks (their dropout masks included) gives the stored run's
// gradients bit for bit.
inline void expect_grad_checkpoint_changes_no_bit(const std::function<std::vector<float>(bool)>& grads_of) {
  const std::vector<float> stored = grads_of(false);
  const std::vector<float> recomputed = grads_of(true);
  ASSERT_EQ(stored.size(), recomputed.size());
  for (size_t i = 0; i < stored.size(); ++i)
    ASSERT_EQ(std::memcmp(&stored[i], &recomputed[i], sizeof(float)), 0)
        << "element " << i << ": " << stored[i] << " vs " << recomputed[i];
}

}  // namespace flotilla::model::lora_check
