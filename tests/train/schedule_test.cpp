// The learning-rate schedule: linear warm-up to the peak, then a half cosine down to
// min_lr at the last step (total_steps - 1), as train/schedule.hpp documents.
#include "flotilla/train/schedule.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "flotilla/base/rng.hpp"
#include "../test_seed.hpp"

namespace flotilla::train {
namespace {

using ::flotilla::testing::test_seed;

// A random schedule: peak in [1e-4, 1e-2), min_lr below it, 2..20 warm-up steps and
// 10..200 decay steps.
CosineSchedule random_schedule(Rng& rng) {
  CosineSchedule s;
  s.peak_lr = 1e-4f + rng.uniform() * 1e-2f;
  s.min_lr = s.peak_lr * 0.1f * rng.uniform();
  s.warmup_steps = 2 + static_cast<int64_t>(rng.below(19));
  s.total_steps = s.warmup_steps + 10 + static_cast<int64_t>(rng.below(191));
  return s;
}

// lr_at is computed in double and rounded once to float: compare to within a few ulps.
constexpr float kRel = 1e-6f;

TEST(CosineSchedule, WarmupRisesLinearlyFromPeakOverWarmupSteps) {
  Rng rng(test_seed());
  const CosineSchedule s = random_schedule(rng);
  EXPECT_NEAR(s.lr_at(0), s.peak_lr / static_cast<float>(s.warmup_steps), kRel * s.peak_lr);
  for (int64_t step = 0; step < s.warmup_steps; ++step)
    EXPECT_NEAR(s.lr_at(step), s.peak_lr * static_cast<float>(step + 1) / static_cast<float>(s.warmup_steps),
                kRel * s.peak_lr)
        << "step " << step;
}

TEST(CosineSchedule, PeakAtTheEndOfWarmup) {
  Rng rng(test_seed());
  const CosineSchedule s = random_schedule(rng);
  EXPECT_NEAR(s.lr_at(s.warmup_steps - 1), s.peak_lr, kRel * s.peak_lr);  // last warm-up step
  EXPECT_NEAR(s.lr_at(s.warmup_steps), s.peak_lr, kRel * s.peak_lr);      // cosine at progress 0
}

// Steps count from 0, so the run's last step (total_steps - 1) is the one at min_lr: the
// learning rate a user asks for with --min-lr is the one the last update uses.
TEST(CosineSchedule, CosineReachesMinLrAtTheLastStepAndStaysThere) {
  Rng rng(test_seed());
  const CosineSchedule s = random_schedule(rng);
  EXPECT_NEAR(s.lr_at(s.total_steps - 1), s.min_lr, kRel * s.peak_lr);
  EXPECT_GT(s.lr_at(s.total_steps - 2), s.min_lr);
  EXPECT_NEAR(s.lr_at(s.total_steps), s.min_lr, kRel * s.peak_lr);
  EXPECT_NEAR(s.lr_at(s.total_steps + 17), s.min_lr, kRel * s.peak_lr);
  // Halfway through the decay the cosine is at 0: the mean of peak and min.
  CosineSchedule even = s;
  const int64_t span = s.total_steps - 1 - s.warmup_steps;  // steps from the peak to the last
  even.total_steps = s.warmup_steps + 2 * span + 1;
  EXPECT_NEAR(even.lr_at(s.warmup_steps + span), 0.5f * (s.peak_lr + s.min_lr), kRel * s.peak_lr);
  // A quarter of the way: min + (peak - min) (1 + cos(pi/4)) / 2.
  const int64_t decay = 4 * (1 + static_cast<int64_t>(rng.below(30)));
  CosineSchedule quarter = s;
  quarter.total_steps = s.warmup_steps + decay + 1;
  const double expected = s.min_lr + (s.peak_lr - s.min_lr) * 0.5 * (1.0 + std::cos(M_PI / 4));
  EXPECT_NEAR(quarter.lr_at(s.warmup_steps + decay / 4), expected, kRel * s.peak_lr);
}

TEST(CosineSchedule, DecreasesMonotonicallyAfterWarmup) {
  Rng rng(test_seed());
  const CosineSchedule s = random_schedule(rng);
  for (int64_t step = s.warmup_steps; step + 1 < s.total_steps; ++step)
    EXPECT_GT(s.lr_at(step), s.lr_at(step + 1)) << "step " << step;
  for (int64_t step = 0; step + 1 < s.warmup_steps; ++step)
    EXPECT_LT(s.lr_at(step), s.lr_at(step + 1)) << "warm-up step " << step;
}

TEST(CosineSchedule, WithoutWarmupTheFirstStepUsesThePeak) {
  Rng rng(test_seed());
  CosineSchedule s = random_schedule(rng);
  s.warmup_steps = 0;
  EXPECT_NEAR(s.lr_at(0), s.peak_lr, kRel * s.peak_lr);
  EXPECT_LT(s.lr_at(1), s.peak_lr);
}

}  // namespace
}  // namespace flotilla::train
