// cross entropy: losses against log-sum-exp in double (also for huge logits), ignore_index,
// and the in-place backward against finite differences of dloss_scale * sum(losses).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "flotilla/kernels/kernels.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::expect_all_close;
using testing::test_seed;
using testing::uniform_vec;

constexpr int32_t kIgnore = -100;

std::vector<double> naive_losses(const std::vector<float>& logits, const std::vector<int32_t>& t,
                                 int64_t N, int64_t V) {
  std::vector<double> out(N, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    if (t[n] == kIgnore) continue;
    double mx = logits[n * V];
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(logits[n * V + j]));
    double s = 0.0;
    for (int64_t j = 0; j < V; ++j) s += std::exp(logits[n * V + j] - mx);
    out[n] = std::log(s) + mx - logits[n * V + t[n]];
  }
  return out;
}

TEST(CrossEntropy, ForwardMatchesLogSumExpAndCountsRows) {
  Rng rng(test_seed());
  const int64_t N = 6, V = 1000;
  const auto logits = uniform_vec(rng, N * V, -5.0f, 5.0f);
  std::vector<int32_t> targets(N);
  for (auto& t : targets) t = static_cast<int32_t>(rng.below(V));
  targets[2] = kIgnore;
  targets[4] = kIgnore;
  std::vector<float> losses(N, std::nanf(""));
  EXPECT_EQ(cross_entropy_forward(losses.data(), logits.data(), targets.data(), N, V, kIgnore), 4);
  // log(sum of 1000 exps) in float: 1e-6 relative on a loss of ~7.
  expect_all_close("losses", losses, naive_losses(logits, targets, N, V), 1e-5, 1e-6);
  EXPECT_EQ(losses[2], 0.0f);
  EXPECT_EQ(losses[4], 0.0f);
}

TEST(CrossEntropy, ForwardIsStableForHugeLogits) {
  // exp(3e4) overflows float; subtracting the row max must keep every loss finite and right.
  Rng rng(test_seed());
  const int64_t N = 3, V = 50;
  auto logits = uniform_vec(rng, N * V, -3.0f, 3.0f);
  for (int64_t j = 0; j < V; ++j) logits[j] += 30000.0f;
  for (int64_t j = 0; j < V; ++j) logits[V + j] -= 30000.0f;
  const std::vector<int32_t> targets = {3, 7, 49};
  std::vector<float> losses(N);
  cross_entropy_forward(losses.data(), logits.data(), targets.data(), N, V, kIgnore);
  // Logits near 3e4 carry float spacing 2e-3: compare against the same rounded inputs.
  expect_all_close("losses", losses, naive_losses(logits, targets, N, V), 1e-5, 1e-5);
  std::vector<float> grad = logits;
  cross_entropy_backward_inplace(grad.data(), targets.data(), N, V, kIgnore, 1.0f);
  for (float g : grad) ASSERT_TRUE(std::isfinite(g));
}

TEST(CrossEntropy, BackwardMatchesFiniteDifferencesAndZeroesIgnoredRows) {
  Rng rng(test_seed());
  const int64_t N = 4, V = 9;
  auto logits = uniform_vec(rng, N * V, -2.0f, 2.0f);
  const std::vector<int32_t> targets = {1, kIgnore, 8, 0};
  const float dloss_scale = 0.37f;
  auto grad = logits;
  cross_entropy_backward_inplace(grad.data(), targets.data(), N, V, kIgnore, dloss_scale);
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(grad[1 * V + j], 0.0f);
  std::vector<float> losses(N);
  testing::expect_gradient_matches("dlogits", logits, grad, [&] {
    cross_entropy_forward(losses.data(), logits.data(), targets.data(), N, V, kIgnore);
    double s = 0.0;
    for (float l : losses) s += l;
    return dloss_scale * s;
  });
}

TEST(CrossEntropy, GradientRowsSumToZeroOnLargeVocab) {
  // softmax - onehot sums to 0 per row; a cheap check of the big-V path (parallel rows).
  Rng rng(test_seed());
  const int64_t N = 8, V = 32000;
  auto grad = uniform_vec(rng, N * V, -4.0f, 4.0f);
  std::vector<int32_t> targets(N);
  for (auto& t : targets) t = static_cast<int32_t>(rng.below(V));
  cross_entropy_backward_inplace(grad.data(), targets.data(), N, V, kIgnore, 2.0f);
  for (int64_t n = 0; n < N; ++n) {
    double s = 0.0;
    for (int64_t j = 0; j < V; ++j) s += grad[n * V + j];
    // The softmax denominator is a float sum of 32000 terms: ~sqrt(V) * 6e-8 = 1e-5 relative
    // when summed in order (unvectorised builds), times dloss_scale 2.
    EXPECT_NEAR(s, 0.0, 1e-4) << "row " << n;
    EXPECT_LT(grad[n * V + targets[n]], 0.0f);
  }
}

}  // namespace
}  // namespace flotilla::kernels
