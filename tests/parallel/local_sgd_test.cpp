// Local SGD / DiLoCo meetings on thread ranks: when ranks meet, and where the outer step
// takes the weights, in closed form.
#include "flotilla/parallel/local_sgd.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "../bounded_settings.hpp"

namespace flotilla::parallel {
namespace {

// Rank r's weights after local training: start + (r + 1) * (element index + 1) * scale.
std::vector<float> local_weights(const std::vector<float>& start, int rank, float scale) {
  std::vector<float> w = start;
  for (size_t i = 0; i < w.size(); ++i) w[i] += static_cast<float>(rank + 1) * static_cast<float>(i + 1) * scale;
  return w;
}

TEST(LocalSgd, RanksMeetEveryHStepsAndTakeTheAverage) {
  const int world = 3;
  const std::vector<float> start = {1.0f, -2.0f, 0.5f, 4.0f, 0.0f};
  comm::run_threads(world, [&](comm::Communicator& comm) {
    DataParallel dp(comm);
    LocalSgd local(dp, {.sync_every = 4}, start);
    std::vector<float> w = local_weights(start, comm.rank(), 0.1f);
    const std::vector<float> mine = w;
    for (int64_t step = 1; step <= 3; ++step) {
      EXPECT_FALSE(local.after_step(w, step));
      EXPECT_EQ(w, mine);  // no meeting: untouched
    }
    EXPECT_TRUE(local.after_step(w, 4));
    // The mean of ranks 0..2: start + 2 * (i + 1) * 0.1.
    for (size_t i = 0; i < w.size(); ++i)
      EXPECT_NEAR(w[i], start[i] + 2.0f * static_cast<float>(i + 1) * 0.1f, 1e-6f);
    // A forced meeting (the last step) off the schedule; the weights are equal already.
    const std::vector<float> met = w;
    EXPECT_TRUE(local.after_step(w, 5, /*force=*/true));
    for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(w[i], met[i], 1e-6f);
    EXPECT_EQ(local.meetings(), 2);
    // Two all-reduces of 5 floats, ring convention: 2 (N-1)/N x 20 bytes each.
    EXPECT_EQ(local.bytes_sent(), 2 * (2 * 2 * 20 / 3));
  }, testing::bounded_settings());
}

TEST(LocalSgd, TheOuterStepIsNesterovOnTheAveragedChange) {
  // Two meetings, two ranks, lr 0.7 and mu 0.9, against the formulas written out:
  //   D1 = a0 - mean(p);  v1 = D1;           a1 = a0 - lr (D1 + mu v1)
  //   D2 = a1 - mean(q);  v2 = mu v1 + D2;   a2 = a1 - lr (D2 + mu v2)
  const float lr = 0.7f, mu = 0.9f;
  const std::vector<float> a0 = {0.3f, -1.0f, 2.0f};
  std::vector<float> a1(3), a2(3);
  for (size_t i = 0; i < 3; ++i) {
    const float mean_p = a0[i] + 1.5f * static_cast<float>(i + 1) * 0.2f;  // ranks 0, 1: (1 + 2) / 2
    const float d1 = a0[i] - mean_p, v1 = d1;
    a1[i] = a0[i] - lr * (d1 + mu * v1);
    const float mean_q = a1[i] + 1.5f * static_cast<float>(i + 1) * -0.05f;
    const float d2 = a1[i] - mean_q, v2 = mu * v1 + d2;
    a2[i] = a1[i] - lr * (d2 + mu * v2);
  }
  comm::run_threads(2, [&](comm::Communicator& comm) {
    DataParallel dp(comm);
    LocalSgd local(dp, {.sync_every = 2, .outer_lr = lr, .outer_momentum = mu}, a0);
    std::vector<float> w = local_weights(a0, comm.rank(), 0.2f);
    ASSERT_TRUE(local.after_step(w, 2));
    for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(w[i], a1[i], 1e-5f);
    w = local_weights(w, comm.rank(), -0.05f);
    ASSERT_TRUE(local.after_step(w, 4));
    for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(w[i], a2[i], 1e-5f);
  }, testing::bounded_settings());
}

TEST(LocalSgd, BadSettingsAreClearErrors) {
  comm::run_threads(1, [&](comm::Communicator& comm) {
    DataParallel dp(comm);
    const std::vector<float> w = {1.0f};
    EXPECT_THROW(LocalSgd(dp, {.sync_every = 0}, w), InputError);
    EXPECT_THROW(LocalSgd(dp, {.sync_every = 2, .outer_lr = 0.0f}, w), InputError);
    EXPECT_THROW(LocalSgd(dp, {.sync_every = 2, .outer_momentum = 1.0f}, w), InputError);
  }, testing::bounded_settings());
}

}  // namespace
}  // namespace flotilla::parallel
