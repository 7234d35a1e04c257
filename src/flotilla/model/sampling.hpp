// Choosing the next token from logits: greedy, or sampling with temperature, top-k and
// top-p (nucleus), from a seeded RNG so a run is repeatable.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "flotilla/base/rng.hpp"

namespace flotilla::model {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax)
  int64_t top_k = 0;         // 0: no limit
  float top_p = 1.0f;        // 1: no limit
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplingParams params);
  int32_t sample(std::span<const float> logits);

 private:
  SamplingParams params_;
  Rng rng_;
  std::vector<std::pair<float, int32_t>> candidates_;  // reused (prob, id)
};

}  // namespace flotilla::model
