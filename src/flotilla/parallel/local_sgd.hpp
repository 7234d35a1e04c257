// Local SGD (Stich 2019; Lin et al. 2020) and DiLoCo (Douillard et al. 2023): ranks train on
// their own, each with its own optimizer, and meet every H steps to average their weights
// instead of averaging gradients every step — 1/H of the traffic, and ranks that drift
// apart for H steps.
//
// At a meeting (the *outer step*) the ranks hold weights theta_r and all remember the
// weights of the last meeting, theta_0. The average's distance from it is the outer
// gradient, Delta = theta_0 - mean_r(theta_r), and an outer optimizer, SGD with Nesterov
// momentum, moves theta_0:
//     v      = mu v + Delta
//     theta_0 = theta_0 - lr (Delta + mu v)
// which every rank then takes. lr = 1, mu = 0 is plain parameter averaging (local SGD);
// DiLoCo uses lr 0.7, mu 0.9. One float32 all-reduce of the weights per meeting.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "flotilla/parallel/data_parallel.hpp"

namespace flotilla::parallel {

struct LocalSgdConfig {
  int64_t sync_every = 0;       // H: steps between meetings; 0: not local SGD
  float outer_lr = 1.0f;        // 1 with outer_momentum 0: plain averaging
  float outer_momentum = 0.0f;  // mu of the Nesterov outer optimizer
};

class LocalSgd {
 public:
  // InputError naming the flag when a setting is out of range.
  static void validate(const LocalSgdConfig& config);

  // `params` are the weights at the start (the same on every rank): the first theta_0.
  LocalSgd(DataParallel& dp, const LocalSgdConfig& config, std::span<const float> params);

  // After optimizer step `step` (1-based): meets the other ranks when step is a multiple
  // of H, or when `force` (the last step). Returns whether it did.
  bool after_step(std::span<float> params, int64_t step, bool force = false);

  // Resume: theta_0 := params (restored from a checkpoint, taken at a meeting); the outer
  // momentum restarts at zero, unless the checkpoint's is then copied into outer_momentum().
  void reset_anchor(std::span<const float> params);

  // DiLoCo's outer momentum v (empty while outer_momentum is 0): this rank's, for a
  // checkpoint to save and restore after reset_anchor (the ranks hold the same v).
  std::span<float> outer_momentum() { return momentum_; }

  int64_t meetings() const { return meetings_; }
  // Bytes this rank sent so far (ring convention: 2(N-1)/N of the weights per meeting).
  int64_t bytes_sent() const { return bytes_sent_; }

 private:
  DataParallel& dp_;
  LocalSgdConfig config_;
  std::vector<float> anchor_;    // theta_0: the weights of the last meeting
  std::vector<float> momentum_;  // v, empty while outer_momentum is 0
  int64_t meetings_ = 0;
  int64_t bytes_sent_ = 0;
};

}  // namespace flotilla::parallel
