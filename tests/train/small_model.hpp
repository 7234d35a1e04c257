// The model shape the trainer and checkpoint tests share: two Llama layers, GQA (4 query
// heads over 2 key/value heads), about 30k parameters, so a step takes milliseconds.
#pragma once

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

}  // namespace flotilla::train::test_models
