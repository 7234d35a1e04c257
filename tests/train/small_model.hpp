// The model shape the trainer and checkpoint tests share: two Llama layers, GQA (4 query
// heads over 2 key/value heads), about 30k parameters, so a step takes milliseconds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "flotilla/model/config.hpp"

namespace flotilla::train::test_models {

inline model::ModelConfig small_config() {
  model::ModelConfig c;
  c.vocab_size = 48;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.ffn_dim = 64;
  c.max_position = 64;
  return c;
}

// `n` tokens below `vocab`, drawn from `seed`: a corpus for a few steps.
inline std::vector<int32_t> random_tokens(uint64_t seed, size_t n, int32_t vocab) {
  Rng rng(seed);
  std::vector<int32_t> s(n);
  for (int32_t& t : s) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  return s;
}

}  // namespace flotilla::train::test_models
