#include "flotilla/train/schedule.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace flotilla::train {

float CosineSchedule::lr_at(int64_t step) const {
  if (step < warmup_steps)
    return peak_lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
  // The last step is total_steps - 1: it is the one that uses min_lr.
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - 1 - warmup_steps);
  const double progress = std::clamp(static_cast<double>(step - warmup_steps) / decay_steps, 0.0, 1.0);
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return static_cast<float>(min_lr + (peak_lr - min_lr) * cosine);
}

}  // namespace flotilla::train
