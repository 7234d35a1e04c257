// The KV-cache decoder computes what the training forward computes: whatever the split of
// a sequence into steps, the logits at a position equal the full forward's logits there.
#include "flotilla/model/decoder.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"
#include "random_model.hpp"

namespace flotilla::model {
namespace {

using ::flotilla::testing::test_seed;
using test_models::random_tokens;

// The model shapes the decoder must agree on; each is one instantiation of every test.
ModelConfig named_config(const std::string& name) {
  ModelConfig c;
  c.vocab_size = 41;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.max_position = 128;
  if (name == "gqa") {
    c.n_kv_heads = 2;  // two query heads per kv head
  } else if (name == "qwen2_bias") {
    c.arch = Architecture::qwen2;
    c.qkv_bias = true;
    c.n_kv_heads = 1;
    c.tie_embeddings = true;
  } else if (name == "llama3_rope") {
    // original_max_position 64 puts the thresholds (64 / low_freq_factor = 64 and
    // 64 / high_freq_factor = 16 positions) among this head_dim's wavelengths (6.3 .. 3000),
    // so some frequencies are divided by `factor` and one is interpolated.
    c.rope_theta = 500000.0f;
    c.rope_scaling.factor = 8.0f;
    c.rope_scaling.original_max_position = 64;
    c.n_kv_heads = 2;
  } else if (name == "mixtral") {
    // Every layer a mixture: 4 experts, top 2, renormalised.
    c.arch = Architecture::mixtral;
    c.n_kv_heads = 2;
    c.moe.num_experts = 4;
    c.moe.top_k = 2;
    c.moe.expert_ffn_dim = c.ffn_dim;
    c.moe.norm_topk_prob = true;
  } else if (name == "qwen2_moe") {
    // Layer 0 dense (mlp_only_layers), layer 1 a mixture with a shared expert, top 3 of 5
    // not renormalised.
    c.arch = Architecture::qwen2_moe;
    c.qkv_bias = true;
    c.moe.num_experts = 5;
    c.moe.top_k = 3;
    c.moe.expert_ffn_dim = 24;
    c.moe.shared_expert_ffn_dim = 40;
    c.moe.norm_topk_prob = false;
    c.moe.mlp_only_layers = {0};
  }
  return c;
}

// Matrices within +-0.4: logits large enough to show a wrong position or a stale cache.
Llama decoder_model(const ModelConfig& cfg, Rng& rng) { return test_models::random_model(cfg, rng, {.weight = 0.4f}); }

// Both sides are float32 with different summation orders (one GEMM over all rows vs one
// row against a cache; attention over T keys vs over a growing cache): ~1e-6 relative.
// 1e-4 of the largest logit is a hundred times that; a wrong position, a stale cache
// entry or a missing bias moves logits of order one by ~0.1.
void expect_logits_near(std::span<const float> got, std::span<const float> want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  float scale = 1.0f;
  for (float x : want) scale = std::max(scale, std::fabs(x));
  const float tol = 1e-4f * scale;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], tol) << what << ", vocabulary id " << i;
}

class DecoderTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    cfg_ = named_config(GetParam());
    rng_ = Rng(test_seed());
  }
  // Full training forward of `tokens` (B = 1): logits (T, V).
  std::vector<float> full_logits(Llama& model, const std::vector<int32_t>& tokens) {
    model.forward(tokens.data(), nullptr, 1, static_cast<int64_t>(tokens.size()));
    const auto l = model.logits();
    return {l.begin(), l.end()};
  }
  std::span<const float> row(const std::vector<float>& logits, int64_t t) const {
    return std::span<const float>(logits).subspan(static_cast<size_t>(t * cfg_.vocab_size),
                                                  static_cast<size_t>(cfg_.vocab_size));
  }

  ModelConfig cfg_;
  Rng rng_;
};

TEST_P(DecoderTest, PromptInOneStepGivesTheLastPositionsLogits) {
  Llama model = decoder_model(cfg_, rng_);
  const int64_t n = 11;
  const auto prompt = random_tokens(rng_, n, cfg_.vocab_size);
  const std::vector<float> full = full_logits(model, prompt);
  Decoder decoder(model, 32);
  const auto got = decoder.step(prompt);
  expect_logits_near(got, row(full, n - 1), "prompt of 11 tokens");
  EXPECT_EQ(decoder.position(), n);
}

TEST_P(DecoderTest, OneTokenAtATimeMatchesTheFullForwardAtEveryPosition) {
  Llama model = decoder_model(cfg_, rng_);
  // Long enough that rope's slow frequencies (and llama3's scaled ones) turn visibly.
  const int64_t T = 40;
  const auto tokens = random_tokens(rng_, T, cfg_.vocab_size);
  const std::vector<float> full = full_logits(model, tokens);
  Decoder decoder(model, T);
  for (int64_t t = 0; t < T; ++t) {
    const auto got = decoder.step(std::span<const int32_t>(&tokens[static_cast<size_t>(t)], 1));
    expect_logits_near(got, row(full, t), "position " + std::to_string(t));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST_P(DecoderTest, PromptInTwoChunksEqualsOneChunk) {
  Llama model = decoder_model(cfg_, rng_);
  const int64_t n = 13;
  const auto prompt = random_tokens(rng_, n, cfg_.vocab_size);
  const auto next = random_tokens(rng_, 1, cfg_.vocab_size);
  const int64_t split = 1 + static_cast<int64_t>(rng_.below(n - 1));
  SCOPED_TRACE("split at " + std::to_string(split));

  Decoder whole(model, 32);
  const auto a = whole.step(prompt);
  const std::vector<float> whole_last(a.begin(), a.end());
  Decoder chunked(model, 32);
  chunked.step(std::span<const int32_t>(prompt).first(static_cast<size_t>(split)));
  const auto b = chunked.step(std::span<const int32_t>(prompt).subspan(static_cast<size_t>(split)));
  expect_logits_near(b, whole_last, "last prompt position");
  // The caches must agree too, which the next token sees.
  const auto a_next = whole.step(next);
  const std::vector<float> whole_next(a_next.begin(), a_next.end());
  expect_logits_near(chunked.step(next), whole_next, "token after the prompt");
}

TEST_P(DecoderTest, ResetStartsANewSequence) {
  Llama model = decoder_model(cfg_, rng_);
  const auto first = random_tokens(rng_, 6, cfg_.vocab_size);
  const auto second = random_tokens(rng_, 5, cfg_.vocab_size);
  const std::vector<float> full = full_logits(model, second);
  Decoder decoder(model, 8);
  decoder.step(first);
  decoder.reset();
  EXPECT_EQ(decoder.position(), 0);
  expect_logits_near(decoder.step(second), row(full, 4), "after reset");
}

TEST_P(DecoderTest, ContextOverflowIsAnInputError) {
  Llama model = decoder_model(cfg_, rng_);
  Decoder decoder(model, 8);
  decoder.step(random_tokens(rng_, 5, cfg_.vocab_size));
  EXPECT_THROW(decoder.step(random_tokens(rng_, 4, cfg_.vocab_size)), InputError);
  // Filling the cache exactly is allowed, one more token is not.
  EXPECT_NO_THROW(decoder.step(random_tokens(rng_, 3, cfg_.vocab_size)));
  EXPECT_EQ(decoder.position(), 8);
  EXPECT_THROW(decoder.step(random_tokens(rng_, 1, cfg_.vocab_size)), InputError);
}

TEST_P(DecoderTest, TokenOutsideTheVocabularyIsAnInputError) {
  Llama model = decoder_model(cfg_, rng_);
  Decoder decoder(model, 8);
  const std::vector<int32_t> bad{1, static_cast<int32_t>(cfg_.vocab_size)};
  EXPECT_THROW(decoder.step(bad), InputError);
}

// The llama3_rope instantiation tests something only if its scaling changes frequencies
// (else it repeats "mha"): some must be divided by the factor, the fastest left alone.
TEST(DecoderConfigs, Llama3ConfigScalesSomeRopeFrequencies) {
  const ModelConfig cfg = named_config("llama3_rope");
  std::vector<float> scaled(static_cast<size_t>(cfg.head_dim / 2)), plain(scaled.size());
  kernels::rope_inv_freq(scaled.data(), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling);
  kernels::rope_inv_freq(plain.data(), cfg.head_dim, cfg.rope_theta, kernels::RopeScaling{});
  EXPECT_EQ(scaled.front(), plain.front());
  EXPECT_NEAR(scaled.back(), plain.back() / cfg.rope_scaling.factor, 1e-6f * plain.back());
}

INSTANTIATE_TEST_SUITE_P(Configs, DecoderTest,
                         ::testing::Values("mha", "gqa", "qwen2_bias", "llama3_rope", "mixtral", "qwen2_moe"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace flotilla::model
