// rmsnorm: forward against the formula in double, backward against finite differences.
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

TEST(RmsNorm, ForwardMatchesFormula) {
  Rng rng(test_seed());
  const int64_t N = 5, C = 37;
  const float eps = 1e-5f;
  const auto inp = uniform_vec(rng, N * C, -2.0f, 2.0f), weight = uniform_vec(rng, C, 0.5f, 1.5f);
  std::vector<float> out(N * C), rstd(N);
  rmsnorm_forward(out.data(), rstd.data(), inp.data(), weight.data(), N, C, eps);
  std::vector<double> want_out(N * C), want_rstd(N);
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(inp[n * C + c]) * inp[n * C + c];
    want_rstd[n] = 1.0 / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) want_out[n * C + c] = inp[n * C + c] * want_rstd[n] * weight[c];
  }
  // A handful of float roundings per element: 1e-6 relative.
  expect_all_close("out", out, want_out, 1e-6, 1e-6);
  expect_all_close("rstd", rstd, want_rstd, 0.0, 1e-6);
}

TEST(RmsNorm, BackwardMatchesFiniteDifferencesAndAddsIntoGradients) {
  Rng rng(test_seed());
  const int64_t N = 4, C = 9;
  const float eps = 1e-5f;
  auto inp = uniform_vec(rng, N * C), weight = uniform_vec(rng, C, 0.5f, 1.5f);
  const auto R = uniform_vec(rng, N * C);
  std::vector<float> out(N * C), rstd(N);
  rmsnorm_forward(out.data(), rstd.data(), inp.data(), weight.data(), N, C, eps);
  const auto dinp0 = uniform_vec(rng, N * C), dweight0 = uniform_vec(rng, C);
  auto dinp = dinp0, dweight = dweight0;
  rmsnorm_backward(dinp.data(), dweight.data(), R.data(), inp.data(), weight.data(), rstd.data(),
                   N, C);
  for (size_t i = 0; i < dinp.size(); ++i) dinp[i] -= dinp0[i];
  for (size_t i = 0; i < dweight.size(); ++i) dweight[i] -= dweight0[i];
  std::vector<float> rstd_scratch(N);
  auto loss = [&] {
    rmsnorm_forward(out.data(), rstd_scratch.data(), inp.data(), weight.data(), N, C, eps);
    return testing::dot(out, R);
  };
  testing::expect_gradient_matches("dinp", inp, dinp, loss);
  testing::expect_gradient_matches("dweight", weight, dweight, loss);
}

TEST(RmsNorm, BackwardWithFrozenWeightGivesTheSameInputGradient) {
  Rng rng(test_seed());
  const int64_t N = 300, C = 130;  // parallel path
  const auto inp = uniform_vec(rng, N * C), weight = uniform_vec(rng, C);
  const auto dout = uniform_vec(rng, N * C);
  std::vector<float> out(N * C), rstd(N);
  rmsnorm_forward(out.data(), rstd.data(), inp.data(), weight.data(), N, C, 1e-6f);
  std::vector<float> dinp_a(N * C, 0.0f), dinp_b(N * C, 0.0f), dweight(C, 0.0f);
  rmsnorm_backward(dinp_a.data(), dweight.data(), dout.data(), inp.data(), weight.data(),
                   rstd.data(), N, C);
  rmsnorm_backward(dinp_b.data(), nullptr, dout.data(), inp.data(), weight.data(), rstd.data(), N,
                   C);
  EXPECT_EQ(dinp_a, dinp_b);
  // and dweight is the column sum of dout * inp * rstd
  std::vector<double> want(C, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      want[c] += static_cast<double>(dout[n * C + c]) * inp[n * C + c] * rstd[n];
  expect_all_close("dweight", dweight, want, 1e-4, 1e-5);
}

}  // namespace
}  // namespace flotilla::kernels
