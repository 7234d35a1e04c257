// The benchmark workloads of the issues (training and LoRA throughput), shared by the C++
// benches; the PyTorch peers (bench/torch_*_throughput.py) use the same shapes.
#pragma once

#include <cstdint>
#include <string_view>

#include "flotilla/model/config.hpp"

namespace flotilla::bench {

struct Workload {
  std::string_view name;
  int64_t dim, n_layers, n_heads, ffn_dim, vocab, seq, batch;
};

inline constexpr Workload kWorkloads[] = {
    {"W1", 288, 6, 6, 768, 32000, 256, 8},
    {"W2", 768, 12, 12, 2048, 32000, 512, 4},
};

// nullptr for an unknown name.
inline const Workload* find_workload(std::string_view name) {
  for (const Workload& w : kWorkloads)
    if (w.name == name) return &w;
  return nullptr;
}

// A Llama with multi-head attention, untied embeddings, eps 1e-5, rope theta 1e4.
inline model::ModelConfig make_config(const Workload& w) {
  model::ModelConfig c;
  c.arch = model::Architecture::llama;
  c.vocab_size = w.vocab;
  c.dim = w.dim;
  c.n_layers = w.n_layers;
  c.n_heads = w.n_heads;
  c.n_kv_heads = w.n_heads;
  c.head_dim = w.dim / w.n_heads;
  c.ffn_dim = w.ffn_dim;
  c.max_position = w.seq;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.tie_embeddings = false;
  return c;
}

}  // namespace flotilla::bench
