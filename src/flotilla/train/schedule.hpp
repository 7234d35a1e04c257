#pragma once

#include <cstdint>

namespace flotilla::train {

// Linear warm-up from 0 to peak over warmup_steps, then cosine decay to min_lr at the
// last step, total_steps - 1. Steps count from 0; the first update uses lr_at(0) = peak / warmup_steps.
struct CosineSchedule {
  float peak_lr = 3e-4f;
  float min_lr = 0.0f;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;

  float lr_at(int64_t step) const;
};

}  // namespace flotilla::train
