// swiglu: forward against the formula, backward against finite differences; the backward
// OVERWRITES dgate and dup.
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

TEST(SwiGlu, ForwardIsSiluOfGateTimesUp) {
  Rng rng(test_seed());
  const int64_t N = 7, F = 45;
  auto gate = uniform_vec(rng, N * F, -6.0f, 6.0f);
  const auto up = uniform_vec(rng, N * F);
  gate[0] = -100.0f;  // silu -> -0 (no overflow to NaN)
  gate[1] = 100.0f;   // silu -> x
  std::vector<float> out(N * F);
  swiglu_forward(out.data(), gate.data(), up.data(), N, F);
  std::vector<double> want(N * F);
  for (int64_t i = 0; i < N * F; ++i) {
    const double g = gate[i];
    want[i] = g / (1.0 + std::exp(-g)) * up[i];
  }
  // exp to ~2 ulp and a few roundings: 1e-6 relative; tiny absolute for silu(-100) ~ 4e-42.
  expect_all_close("out", out, want, 1e-30, 1e-6);
}

TEST(SwiGlu, BackwardMatchesFiniteDifferencesAndOverwrites) {
  Rng rng(test_seed());
  const int64_t N = 3, F = 11;
  auto gate = uniform_vec(rng, N * F, -3.0f, 3.0f), up = uniform_vec(rng, N * F);
  const auto R = uniform_vec(rng, N * F);
  // NaN in the outputs: only a backward that overwrites (rather than adds) gets finite values.
  std::vector<float> dgate(N * F, std::nanf("")), dup(N * F, std::nanf(""));
  swiglu_backward(dgate.data(), dup.data(), R.data(), gate.data(), up.data(), N, F);
  std::vector<float> out(N * F);
  auto loss = [&] {
    swiglu_forward(out.data(), gate.data(), up.data(), N, F);
    return testing::dot(out, R);
  };
  testing::expect_gradient_matches("dgate", gate, dgate, loss);
  testing::expect_gradient_matches("dup", up, dup, loss);
}

}  // namespace
}  // namespace flotilla::kernels
