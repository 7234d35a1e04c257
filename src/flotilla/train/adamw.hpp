// AdamW over a model's flat parameter buffer: moments in two buffers of the same layout;
// weight decay only on tensors whose ParamInfo says so (not on norms and biases).
#pragma once

#include <cstdint>
#include <span>

#include "flotilla/base/buffer.hpp"
#include "flotilla/model/params.hpp"

namespace flotilla::train {

struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
};

class AdamW {
 public:
  AdamW(const model::ParamTable& table, AdamWConfig cfg);
  // One update with learning rate lr; increments step().
  void step(std::span<float> params, std::span<const float> grads, float lr);
  int64_t steps_taken() const { return step_; }
  // Optimizer state (for checkpoints): first and second moments, same layout as params.
  std::span<float> m() { return m_.span(); }
  std::span<float> v() { return v_.span(); }
  void set_steps_taken(int64_t s) { step_ = s; }

 private:
  const model::ParamTable& layout_;
  AdamWConfig cfg_;
  Buffer<float> m_, v_;
  int64_t step_ = 0;
};

}  // namespace flotilla::train
