// rope: frequencies (plain and Llama 3 scaled), the cos/sin table, the rotate_half layout,
// and the backward as the transpose of the forward.
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

TEST(Rope, InvFreqIsThetaToTheMinusTwoIOverHd) {
  const int64_t hd = 64;
  std::vector<float> inv(hd / 2);
  rope_inv_freq(inv.data(), hd, 10000.0f, RopeScaling{});
  std::vector<double> want(hd / 2);
  for (int64_t i = 0; i < hd / 2; ++i) want[i] = std::pow(10000.0, -2.0 * i / hd);
  expect_all_close("inv_freq", inv, want, 0.0, 1e-6);  // a few float roundings
}

TEST(Rope, Llama3ScalingMatchesHandComputedValues) {
  // hd = 8, theta = 500000: inv_freq = 500000^(-i/4) = 1, 0.0376060, 0.00141421, 5.31830e-5,
  // wavelengths 2 pi / inv = 6.28, 167.1, 4442.9, 118142.8. With factor 8, low 1, high 4,
  // original 8192: high_freq_wavelen = 2048, low_freq_wavelen = 8192, so
  //   i = 0, 1: wavelen < 2048, kept;
  //   i = 2:    2048 <= 4442.9 <= 8192, smooth = (8192 / 4442.9 - 1) / (4 - 1) = 0.2812826,
  //             inv = (1 - smooth) * inv / 8 + smooth * inv = 5.248462e-4;
  //   i = 3:    wavelen > 8192, inv / 8 = 6.647870e-6.
  RopeScaling scaling;
  scaling.factor = 8.0f;
  scaling.low_freq_factor = 1.0f;
  scaling.high_freq_factor = 4.0f;
  scaling.original_max_position = 8192;
  std::vector<float> inv(4);
  rope_inv_freq(inv.data(), 8, 500000.0f, scaling);
  const std::vector<double> want = {1.0, 0.03760603093086393, 0.0005248461609929547,
                                    6.647869871181235e-06};
  expect_all_close("inv_freq", inv, want, 0.0, 2e-6);
}

TEST(Rope, TableIsCosSinOfFloat32Angles) {
  // The angle is the float32 product position * inv_freq, as Hugging Face computes it; cos and
  // sin of that angle are then rounded once. At position ~8000 this differs from the cosine
  // of the exact (double) angle by far more than one ulp, so this pins the convention.
  const int64_t hd = 16, T = 3, pos0 = 8190;
  std::vector<float> inv(hd / 2), cos(T * hd / 2), sin(T * hd / 2);
  rope_inv_freq(inv.data(), hd, 10000.0f, RopeScaling{});
  rope_table(cos.data(), sin.data(), inv.data(), pos0, T, hd);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float angle = static_cast<float>(pos0 + t) * inv[i];
      EXPECT_EQ(cos[t * hd / 2 + i], static_cast<float>(std::cos(static_cast<double>(angle))));
      EXPECT_EQ(sin[t * hd / 2 + i], static_cast<float>(std::sin(static_cast<double>(angle))));
    }
}

// x (B, T, NH, hd) rotated in double with pairs (i, i + hd/2) at angle pos * inv[i].
std::vector<double> naive_rope(const std::vector<float>& x, const std::vector<float>& inv,
                               int64_t pos0, int64_t B, int64_t T, int64_t NH, int64_t hd) {
  std::vector<double> y(x.size());
  const int64_t half = hd / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const double a = static_cast<double>(static_cast<float>(pos0 + t) * inv[i]);
          const int64_t base = ((b * T + t) * NH + h) * hd;
          const double x1 = x[base + i], x2 = x[base + i + half];
          y[base + i] = x1 * std::cos(a) - x2 * std::sin(a);
          y[base + i + half] = x2 * std::cos(a) + x1 * std::sin(a);
        }
  return y;
}

TEST(Rope, ForwardRotatesHalvesByPositionAngle) {
  Rng rng(test_seed());
  const int64_t B = 2, T = 5, NH = 3, hd = 8, pos0 = 7;
  auto x = uniform_vec(rng, B * T * NH * hd);
  std::vector<float> inv(hd / 2), cos(T * hd / 2), sin(T * hd / 2);
  rope_inv_freq(inv.data(), hd, 10000.0f, RopeScaling{});
  rope_table(cos.data(), sin.data(), inv.data(), pos0, T, hd);
  const auto want = naive_rope(x, inv, pos0, B, T, NH, hd);
  rope_forward(x.data(), cos.data(), sin.data(), B, T, NH, hd);
  expect_all_close("x", x, want, 1e-6, 1e-6);
}

TEST(Rope, BackwardMatchesFiniteDifferences) {
  Rng rng(test_seed());
  const int64_t B = 2, T = 5, NH = 3, hd = 6;
  auto x = uniform_vec(rng, B * T * NH * hd);
  const auto R = uniform_vec(rng, x.size());
  std::vector<float> inv(hd / 2), cos(T * hd / 2), sin(T * hd / 2);
  rope_inv_freq(inv.data(), hd, 10000.0f, RopeScaling{});
  rope_table(cos.data(), sin.data(), inv.data(), 3, T, hd);
  auto dx = R;  // in place: dout in, dinp out
  rope_backward(dx.data(), cos.data(), sin.data(), B, T, NH, hd);
  std::vector<float> y(x.size());
  testing::expect_gradient_matches("dx", x, dx, [&] {
    y = x;
    rope_forward(y.data(), cos.data(), sin.data(), B, T, NH, hd);
    return testing::dot(y, R);
  });
}

TEST(Rope, BackwardUndoesForward) {
  // A rotation's transpose is its inverse.
  Rng rng(test_seed());
  const int64_t B = 1, T = 40, NH = 2, hd = 16;
  const auto x0 = uniform_vec(rng, B * T * NH * hd);
  std::vector<float> inv(hd / 2), cos(T * hd / 2), sin(T * hd / 2);
  rope_inv_freq(inv.data(), hd, 500000.0f, RopeScaling{});
  rope_table(cos.data(), sin.data(), inv.data(), 0, T, hd);
  auto x = x0;
  rope_forward(x.data(), cos.data(), sin.data(), B, T, NH, hd);
  EXPECT_NE(x, x0);
  rope_backward(x.data(), cos.data(), sin.data(), B, T, NH, hd);
  expect_all_close("x", x, x0, 1e-6, 1e-6);
}

}  // namespace
}  // namespace flotilla::kernels
