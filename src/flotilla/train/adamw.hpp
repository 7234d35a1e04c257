// AdamW over a model's flat parameter buffer, or over the ranges of it this rank owns
// (ZeRO: parallel/gradient_sync.hpp): the moments hold only those ranges, concatenated;
// weight decay only on tensors whose ParamInfo says so (not on norms and biases). The
// update is elementwise, so updating a range gives exactly what the whole update gives
// there.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "flotilla/base/buffer.hpp"
#include "flotilla/model/params.hpp"

namespace flotilla::train {

struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
};

// [begin, end) of the flat parameter layout, in floats.
struct FlatRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

class AdamW {
 public:
  // Over the whole layout.
  AdamW(const model::ParamTable& table, AdamWConfig cfg);
  // Over `owned` only: ascending, disjoint ranges inside the layout.
  AdamW(const model::ParamTable& table, AdamWConfig cfg, std::vector<FlatRange> owned);
  // One update with learning rate lr; increments step(). `params` is the whole flat buffer;
  // `grads` the gradients of the owned ranges, concatenated (the whole gradient when the
  // optimizer owns everything).
  void step(std::span<float> params, std::span<const float> grads, float lr);
  int64_t steps_taken() const { return step_; }
  // Optimizer state (for checkpoints): first and second moments of the owned ranges,
  // concatenated (the layout of params when it owns everything).
  std::span<float> m() { return m_.span(); }
  std::span<float> v() { return v_.span(); }
  const std::vector<FlatRange>& owned() const { return owned_; }
  void set_steps_taken(int64_t s) { step_ = s; }

 private:
  const model::ParamTable& layout_;
  AdamWConfig cfg_;
  std::vector<FlatRange> owned_;
  Buffer<float> m_, v_;
  int64_t step_ = 0;
};

}  // namespace flotilla::train
