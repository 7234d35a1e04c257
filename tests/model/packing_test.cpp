// A row that packs several examples computes what the examples compute in rows of their
// own: the same per-token losses and the same parameter gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"

namespace flotilla::model {
namespace {

ModelConfig packing_config() {
  ModelConfig cfg;
  cfg.vocab_size = 41;
  cfg.dim = 32;
  cfg.n_layers = 2;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 8;
  cfg.ffn_dim = 48;
  cfg.qkv_bias = true;
  cfg.initializer_range = 0.2f;  // large enough that attention is far from uniform
  return cfg;
}

TEST(Packing, PackedRowEqualsSeparateRows) {
  const uint64_t seed = ::flotilla::testing::test_seed();
  Rng rng(seed);
  Llama model(packing_config());
  model.init_random(seed);
  const std::vector<int64_t> lengths = {4, 7, 5};
  const int64_t T = 16;  // 4 + 7 + 5
  std::vector<int32_t> tokens(T), targets(T), doc_start(T);
  int32_t start = 0;
  for (int64_t len : lengths) {
    for (int64_t i = 0; i < len; ++i) {
      tokens[static_cast<size_t>(start + i)] = static_cast<int32_t>(rng.below(41));
      // The last token of an example has no target inside it.
      targets[static_cast<size_t>(start + i)] = i + 1 < len ? static_cast<int32_t>(rng.below(41)) : kIgnoreIndex;
      doc_start[static_cast<size_t>(start + i)] = start;
    }
    start += static_cast<int32_t>(len);
  }

  model.zero_grads();
  const LossSum packed = model.forward(tokens.data(), targets.data(), 1, T, doc_start.data());
  const std::vector<float> packed_losses(model.token_losses().begin(), model.token_losses().end());
  model.backward(1.0f);
  const std::vector<float> packed_grads(model.grads().begin(), model.grads().end());

  model.zero_grads();
  LossSum separate;
  start = 0;
  for (int64_t len : lengths) {
    const LossSum l = model.forward(tokens.data() + start, targets.data() + start, 1, len);
    for (int64_t i = 0; i < len; ++i)
      EXPECT_NEAR(model.token_losses()[static_cast<size_t>(i)], packed_losses[static_cast<size_t>(start + i)], 1e-5)
          << "token " << i << " of the example at " << start;
    model.backward(1.0f);  // gradients add up over the examples
    separate.sum += l.sum;
    separate.num_tokens += l.num_tokens;
    start += static_cast<int32_t>(len);
  }
  EXPECT_EQ(packed.num_tokens, separate.num_tokens);
  EXPECT_NEAR(packed.sum, separate.sum, 1e-4 * std::fabs(separate.sum));
  // Float rounding only (different GEMM shapes): relative to the largest gradient.
  const std::span<const float> g = model.grads();
  float scale = 0.0f;
  for (float x : g) scale = std::max(scale, std::fabs(x));
  for (size_t i = 0; i < g.size(); ++i) ASSERT_NEAR(packed_grads[i], g[i], 1e-5f * scale) << "parameter element " << i;
}

TEST(Packing, PackingChangesResultsWhenBoundariesAreIgnored) {
  // The same tokens as one plain causal row give different losses: the test above would
  // fail if doc_start were ignored.
  Llama model(packing_config());
  model.init_random(3);
  std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8}, targets = {2, 3, 4, kIgnoreIndex, 6, 7, 8, kIgnoreIndex};
  std::vector<int32_t> doc_start = {0, 0, 0, 0, 4, 4, 4, 4};
  const LossSum packed = model.forward(tokens.data(), targets.data(), 1, 8, doc_start.data());
  const LossSum plain = model.forward(tokens.data(), targets.data(), 1, 8);
  EXPECT_GT(std::fabs(packed.sum - plain.sum), 1e-3);
}

TEST(Packing, RejectsStartsPastTheToken) {
  Llama model(packing_config());
  std::vector<int32_t> tokens = {1, 2, 3}, doc_start = {0, 2, 2};
  EXPECT_THROW(model.forward(tokens.data(), nullptr, 1, 3, doc_start.data()), InputError);
}

}  // namespace
}  // namespace flotilla::model
