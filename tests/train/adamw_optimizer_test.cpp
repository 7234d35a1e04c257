// train::AdamW over a model's parameter layout: decoupled weight decay on weight
// matrices only (never on norms and biases), and Adam's normalised first step.
#include "flotilla/train/adamw.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"

namespace flotilla::train {
namespace {

using ::flotilla::testing::test_seed;

// Qwen2 shapes, so the layout holds every kind of tensor: embeddings, weight matrices,
// norms and q/k/v biases.
model::ModelConfig small_qwen2() {
  model::ModelConfig c;
  c.arch = model::Architecture::qwen2;
  c.qkv_bias = true;
  c.vocab_size = 29;
  c.dim = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.ffn_dim = 24;
  return c;
}

bool is_norm_or_bias(const std::string& name) {
  return name.ends_with("norm.weight") || name.ends_with(".bias");
}

TEST(AdamW, LayoutExemptsExactlyNormsAndBiasesFromDecay) {
  const model::ParamLayout layout(small_qwen2());
  int exempt = 0;
  for (const model::ParamInfo& info : layout.params()) {
    EXPECT_EQ(info.decay, !is_norm_or_bias(info.name)) << info.name;
    exempt += !info.decay;
  }
  EXPECT_EQ(exempt, 2 * (2 + 3) + 1);  // per layer 2 norms + 3 biases; the final norm
}

TEST(AdamW, ZeroGradientDecaysWeightsOnlyByOneMinusLrTimesDecay) {
  Rng rng(test_seed());
  model::Llama model(small_qwen2());
  // Every parameter non-zero (biases too), so a decay applied where it should not be
  // would show.
  rng.fill_uniform(model.params(), -1.0f, 1.0f);
  const std::vector<float> before(model.params().begin(), model.params().end());
  const std::vector<float> zero_grads(before.size(), 0.0f);
  const float lr = 0.01f + 0.05f * rng.uniform(), wd = 0.05f + 0.2f * rng.uniform();
  AdamW opt(model.layout(), AdamWConfig{.weight_decay = wd});
  opt.step(model.params(), zero_grads, lr);
  EXPECT_EQ(opt.steps_taken(), 1);

  // With g = 0 the moments stay 0 and the Adam term is exactly 0: only the decay acts,
  // one float multiply by (1 - lr wd) (rounded once), hence a relative tolerance of 2 ulps.
  const float factor = static_cast<float>(1.0 - static_cast<double>(lr) * wd);
  const std::span<const float> after = model.params();
  for (const model::ParamInfo& info : model.layout().params()) {
    for (int64_t j = 0; j < info.numel; ++j) {
      const size_t i = static_cast<size_t>(info.offset + j);
      if (info.decay)
        ASSERT_NEAR(after[i], before[i] * factor, 2.4e-7f * std::fabs(before[i])) << info.name << "[" << j << "]";
      else
        ASSERT_EQ(after[i], before[i]) << info.name << "[" << j << "] is a norm or bias: no decay";
    }
  }
}

TEST(AdamW, FirstStepMovesEachParameterByLrAgainstItsGradientSign) {
  // Bias-corrected moments after one step are m = g and v = g^2, so the update is
  // lr * g / (|g| + eps): lr times the sign of g whatever its size (here |g| >= 1e-3,
  // so eps = 1e-8 changes it by < 1e-5 relative).
  Rng rng(test_seed());
  model::Llama model(small_qwen2());
  rng.fill_uniform(model.params(), -1.0f, 1.0f);
  const std::vector<float> before(model.params().begin(), model.params().end());
  std::vector<float> grads(before.size());
  for (float& g : grads) {
    const float mag = std::pow(10.0f, -3.0f + 4.0f * rng.uniform());  // 1e-3 .. 10
    g = rng.uniform() < 0.5f ? -mag : mag;
  }
  const float lr = 1e-3f;
  AdamW opt(model.layout(), AdamWConfig{.weight_decay = 0.0f});
  opt.step(model.params(), grads, lr);
  const std::span<const float> after = model.params();
  for (const model::ParamInfo& info : model.layout().params())
    for (int64_t j = 0; j < info.numel; ++j) {
      const size_t i = static_cast<size_t>(info.offset + j);
      const float expected = before[i] - lr * (grads[i] > 0 ? 1.0f : -1.0f);
      // Rounding of p (|p| <= 1) dominates: 1 ulp of 1 is 1.2e-7; 1e-6 forgives a few
      // roundings and is 1e-3 of the step.
      ASSERT_NEAR(after[i], expected, 1e-6f) << info.name << "[" << j << "] grad " << grads[i];
    }
}

TEST(AdamW, ShardsOfTheLayoutUpdateAsTheWholeDoes) {
  // ZeRO's split (parallel/zero.hpp): N shards of floor(P/N) floats cutting through tensors
  // anywhere, plus a tail every shard owns. Each shard's optimizer sees only its ranges'
  // gradients, concatenated, and keeps only their moments; after a few steps the weights and
  // moments are the whole optimizer's. The update is elementwise, so they agree to float
  // rounding (4 ulps: vector and scalar code may contract multiply-adds differently).
  Rng rng(test_seed());
  model::Llama whole_model(small_qwen2());
  rng.fill_uniform(whole_model.params(), -1.0f, 1.0f);
  const auto P = static_cast<int64_t>(whole_model.params().size());
  const std::vector<float> start(whole_model.params().begin(), whole_model.params().end());
  for (const int N : {3, 4, 5, 7, 11, 13}) {
    if (P % N == 0) continue;  // the test wants a tail; most of these leave one
    const int64_t c = P / N;
    std::vector<AdamW> shards;
    std::vector<std::vector<FlatRange>> owned(static_cast<size_t>(N));
    for (int r = 0; r < N; ++r) {
      owned[static_cast<size_t>(r)] = {{r * c, (r + 1) * c}, {N * c, P}};
      shards.emplace_back(whole_model.layout(), AdamWConfig{.weight_decay = 0.1f}, owned[static_cast<size_t>(r)]);
    }
    AdamW reference(whole_model.layout(), AdamWConfig{.weight_decay = 0.1f});
    std::vector<float> ref_params = start, shard_params = start;
    for (int step = 0; step < 3; ++step) {
      std::vector<float> grads(static_cast<size_t>(P));
      rng.fill_uniform(grads, -1.0f, 1.0f);
      reference.step(ref_params, grads, 1e-2f);
      // Every rank updates its ranges of its own copy; the copies are then merged (the
      // all-gather), the tail from any rank.
      std::vector<float> merged = shard_params;
      for (int r = 0; r < N; ++r) {
        std::vector<float> mine = shard_params, g;
        for (const FlatRange& range : owned[static_cast<size_t>(r)])
          g.insert(g.end(), grads.begin() + range.begin, grads.begin() + range.end);
        shards[static_cast<size_t>(r)].step(mine, g, 1e-2f);
        for (const FlatRange& range : owned[static_cast<size_t>(r)])
          std::copy(mine.begin() + range.begin, mine.begin() + range.end, merged.begin() + range.begin);
      }
      shard_params = merged;
    }
    for (size_t i = 0; i < shard_params.size(); ++i)
      ASSERT_FLOAT_EQ(shard_params[i], ref_params[i]) << N << " shards, weight [" << i << "]";
    for (AdamW& shard : shards) {
      EXPECT_EQ(shard.steps_taken(), 3);
      size_t at = 0;  // the moments hold the owned ranges one after the other
      for (const FlatRange& range : shard.owned())
        for (int64_t i = range.begin; i < range.end; ++i, ++at) {
          ASSERT_FLOAT_EQ(shard.m()[at], reference.m()[static_cast<size_t>(i)]) << N << " shards, m[" << i << "]";
          ASSERT_FLOAT_EQ(shard.v()[at], reference.v()[static_cast<size_t>(i)]) << N << " shards, v[" << i << "]";
        }
    }
  }
}

TEST(AdamW, OwnedRangesMustBeAscendingAndInside) {
  const model::ParamLayout layout(small_qwen2());
  const int64_t P = layout.total_numel();
  const auto make = [&](std::vector<FlatRange> owned) { AdamW opt(layout, {}, std::move(owned)); };
  EXPECT_THROW(make({{10, 20}, {5, 30}}), Error);
  EXPECT_THROW(make({{0, P + 1}}), Error);
  EXPECT_NO_THROW(make({{0, 10}, {10, P}}));
}

}  // namespace
}  // namespace flotilla::train
