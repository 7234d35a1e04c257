#include "flotilla/parallel/local_sgd.hpp"

#include <cmath>

#include <fmt/format.h>

#include <algorithm>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::parallel {

LocalSgd::LocalSgd(DataParallel& dp, const LocalSgdConfig& config, std::span<const float> params)
    : dp_(dp), config_(config), anchor_(params.begin(), params.end()) {
  validate(config);
  if (config.outer_momentum > 0.0f) momentum_.assign(params.size(), 0.0f);
}

void LocalSgd::validate(const LocalSgdConfig& config) {
  if (config.sync_every < 1)
    throw InputError("parallel", fmt::format("local SGD needs --sync-every >= 1, not {}", config.sync_every));
  if (!(config.outer_lr > 0.0f && std::isfinite(config.outer_lr)))
    throw InputError("parallel", fmt::format("--outer-lr must be a finite positive number, not {}", config.outer_lr));
  if (!(config.outer_momentum >= 0.0f && config.outer_momentum < 1.0f))
    throw InputError("parallel", fmt::format("--outer-momentum must be in [0, 1), not {}", config.outer_momentum));
}

void LocalSgd::reset_anchor(std::span<const float> params) {
  anchor_.assign(params.begin(), params.end());
  std::fill(momentum_.begin(), momentum_.end(), 0.0f);
}

bool LocalSgd::after_step(std::span<float> params, int64_t step, bool force) {
  if (!force && step % config_.sync_every != 0) return false;
  const int world = dp_.world();
  dp_.communicator().all_reduce(params, comm::ReduceOp::avg, comm::Options{.name = "local SGD weights"});
  bytes_sent_ += comm::ring_all_reduce_bytes(static_cast<int64_t>(params.size_bytes()), world);
  ++meetings_;
  const float lr = config_.outer_lr, mu = config_.outer_momentum;
  if (lr == 1.0f && mu == 0.0f) {  // plain averaging: theta_0 = the average
    std::copy(params.begin(), params.end(), anchor_.begin());
    return true;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const float delta = anchor_[i] - params[i];  // outer gradient
    float step_dir = delta;
    if (mu > 0.0f) {
      momentum_[i] = mu * momentum_[i] + delta;
      step_dir = delta + mu * momentum_[i];  // Nesterov
    }
    anchor_[i] -= lr * step_dir;
    params[i] = anchor_[i];
  }
  return true;
}

}  // namespace flotilla::parallel
