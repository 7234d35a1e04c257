// How far float32 rounding alone moves a model's gradients, for tests that compare two
// float32 computations of one gradient summed in different orders (tensor parallelism splits
// a product's sum over its ranks; a pipeline or ZeRO adds micro-batches or shards in another
// order).
//
// Such a difference is rounding amplified by the model's own conditioning at the draw in
// hand, and with order-one random weights (random_model.hpp) that conditioning varies by
// orders of magnitude between seeds. Measured on the tp LoRA test's seed
// 12181650701941647467 (tiny_qwen2, LoRA on every layer, dropout 0.25), replayed in
// PyTorch float64 from the same weights, tokens and dropout masks: moving every weight and
// adapter by float32's unit roundoff (relative 2^-24) in exact float64 arithmetic moves
// layer 0's q and k adapter gradients by up to 6.4e-3 of their tensor's largest element, so
// no float32 computation can be nearer the exact gradient than about that: flotilla's one
// rank is 2.2e-3 from it, its tp path 2.3e-3, PyTorch's own float32 6.9e-3; the tp path and
// the one rank differ by 1.6e-4 of the scale. A fixed tolerance of 1e-4 of the scale
// therefore fails such draws for no fault of the code: 5 of 1200 runs (300 fresh seeds of
// the test's four cases), up to 4.6 times over. (Replay: tp_lora_replay_dump_test.cpp and
// tests/reference/replay_tp_lora_float64.py.)
//
// What these helpers measure instead is the draw's own sensitivity: the same forward and
// backward again with every input float moved by one unit in the last place, up or down at
// random (nudge_one_ulp), and the largest change per tensor (largest_change). A test then
// accepts a difference of a few times that, with its usual relative tolerance as the floor
// for well-conditioned draws; a missing term or a wrong slice moves a gradient by a share of
// its scale, far above the rounding noise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "flotilla/model/params.hpp"

namespace flotilla::model::test_models {

// Every float of `v` moved to its neighbour above or below (one unit in the last place,
// relative 2^-24 to 2^-23), the direction drawn from `rng`: what one rounding could have left.
inline void nudge_one_ulp(std::span<float> v, Rng& rng) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (float& x : v) x = std::nextafter(x, rng.uniform() < 0.5f ? -inf : inf);
}

// max_i |a[i] - b[i]| over [offset, offset + n) of both.
inline double largest_change(std::span<const float> a, std::span<const float> b, int64_t offset, int64_t n) {
  double most = 0.0;
  for (int64_t i = offset; i < offset + n; ++i)
    most = std::max(most, std::abs(static_cast<double>(a[static_cast<size_t>(i)]) - b[static_cast<size_t>(i)]));
  return most;
}

// A draw's rounding noise: per tensor of a gradient table, and of the clipping norm's square.
struct RoundingNoise {
  std::vector<double> tensor;  // the largest change of each tensor's gradient
  double norm2 = 0.0;          // of the norm's square
};

// The one-rank step again, twice, each time with every float of `nudged` one ulp off
// (nudge_one_ulp; restored after): `step` zeroes the gradients, runs forward and backward
// and returns the clipping norm's square; it leaves the gradients in `grads`, compared with
// `reference` (the unmoved step's, `reference_norm2` its norm's square) tensor by tensor of
// `tensors`.
template <class Step>
RoundingNoise rounding_noise(std::initializer_list<std::span<float>> nudged, std::span<const float> grads,
                             std::span<const float> reference, std::span<const ParamInfo> tensors,
                             double reference_norm2, Rng& rng, Step&& step) {
  std::vector<std::vector<float>> saved;
  for (const std::span<float> v : nudged) saved.emplace_back(v.begin(), v.end());
  RoundingNoise noise{std::vector<double>(tensors.size(), 0.0), 0.0};
  for (int k = 0; k < 2; ++k) {
    for (const std::span<float> v : nudged) nudge_one_ulp(v, rng);
    noise.norm2 = std::max(noise.norm2, std::abs(step() - reference_norm2));
    for (size_t t = 0; t < tensors.size(); ++t)
      noise.tensor[t] = std::max(noise.tensor[t], largest_change(grads, reference, tensors[t].offset, tensors[t].numel));
    size_t i = 0;
    for (const std::span<float> v : nudged) std::copy(saved[i].begin(), saved[i].end(), v.begin()), ++i;
  }
  return noise;
}

}  // namespace flotilla::model::test_models
