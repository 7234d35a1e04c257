// cross entropy: losses against log-sum-exp in double (also for huge logits), ignore_index,
// and the in-place backward against finite differences of dloss_scale * sum(losses). The
// vocabulary-parallel pieces (tensor parallelism): three uneven column slices combined as
// the model combines them give the whole vocabulary's losses and gradient.
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

TEST(CrossEntropy, VocabularySlicesCombinedGiveTheWholeLossAndGradient) {
  Rng rng(test_seed());
  const int64_t N = 5, V = 101;
  const int64_t cuts[] = {0, 33, 67, V};  // three slices of 33, 34 and 34 columns
  const auto logits = uniform_vec(rng, N * V, -8.0f, 8.0f);
  std::vector<int32_t> targets(N);
  for (auto& t : targets) t = static_cast<int32_t>(rng.below(V));
  targets[1] = kIgnore;
  targets[3] = 66;  // the last column of the middle slice
  std::vector<float> whole_losses(N), whole_grad = logits;
  cross_entropy_forward(whole_losses.data(), logits.data(), targets.data(), N, V, kIgnore);
  cross_entropy_backward_inplace(whole_grad.data(), targets.data(), N, V, kIgnore, 0.5f);

  std::vector<std::vector<float>> slices(3);
  for (int s = 0; s < 3; ++s)
    for (int64_t n = 0; n < N; ++n)
      slices[s].insert(slices[s].end(), logits.begin() + n * V + cuts[s], logits.begin() + n * V + cuts[s + 1]);
  // 1. the max over the slices; 2. the sums over them.
  std::vector<float> row_max(N, -INFINITY), sum_exp(N, 0.0f), target_logit(N, 0.0f);
  for (int s = 0; s < 3; ++s) {
    std::vector<float> m(N);
    cross_entropy_slice_max(m.data(), slices[s].data(), N, cuts[s + 1] - cuts[s]);
    for (int64_t n = 0; n < N; ++n) row_max[n] = std::max(row_max[n], m[n]);
  }
  for (int s = 0; s < 3; ++s) {
    std::vector<float> e(N), t(N);
    cross_entropy_slice_sums(e.data(), t.data(), slices[s].data(), row_max.data(), targets.data(), N,
                             cuts[s + 1] - cuts[s], cuts[s], kIgnore);
    for (int64_t n = 0; n < N; ++n) {
      sum_exp[n] += e[n];
      target_logit[n] += t[n];
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    const float loss = targets[n] == kIgnore ? 0.0f : std::log(sum_exp[n]) - target_logit[n];
    EXPECT_NEAR(loss, whole_losses[n], 1e-5f * std::max(1.0f, std::abs(whole_losses[n]))) << "row " << n;
  }
  // 3. each slice's gradient is its columns of the whole one.
  for (int s = 0; s < 3; ++s) {
    const int64_t W = cuts[s + 1] - cuts[s];
    cross_entropy_slice_backward_inplace(slices[s].data(), row_max.data(), sum_exp.data(), targets.data(), N, W,
                                         cuts[s], kIgnore, 0.5f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < W; ++j)
        EXPECT_NEAR(slices[s][n * W + j], whole_grad[n * V + cuts[s] + j], 1e-6f) << "slice " << s << " row " << n;
  }
}

}  // namespace
}  // namespace flotilla::kernels
