// adamw: two steps against values worked out by hand from the formula, and the decay-only
// closed form. Tolerances are float32 rounding (the kernel runs in float, the reference is
// double): 1e-6 relative.
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

TEST(AdamW, TwoStepsMatchHandComputedReference) {
  // lr 0.1, betas (0.9, 0.999), eps 1e-3 (large, so that where eps sits matters), wd 0.1.
  // Element 0: p = 1, g = 0.5 then -0.2.
  //   step 1: m = 0.05, v = 2.5e-4, mhat = 0.5, vhat = 0.25,
  //           p = 1 - 0.1 * (0.5 / (0.5 + 1e-3) + 0.1 * 1) = 0.8901996007984032
  //   step 2: m = 0.025, v = 2.8975e-4, mhat = 0.025 / 0.19, vhat = 2.8975e-4 / 0.001999,
  //           p = 0.8468275591741654
  // Element 1: p = -2, g = -1e-3 then 3: step 1 mhat / (sqrt(vhat) + eps) = -1e-3 / 2e-3,
  //   p = -2 - 0.1 * (-0.5 - 0.2) = -1.93; step 2 p = -1.9850563109881378.
  // Element 2: p = 0.5, g = 0: decay only, p = 0.5 * 0.99 = 0.495, then 0.49005.
  AdamWParams hp;
  hp.lr = 0.1f;
  hp.beta1 = 0.9f;
  hp.beta2 = 0.999f;
  hp.eps = 1e-3f;
  hp.weight_decay = 0.1f;
  std::vector<float> p = {1.0f, -2.0f, 0.5f}, m(3, 0.0f), v(3, 0.0f);
  hp.step = 1;
  const std::vector<float> g1 = {0.5f, -1e-3f, 0.0f};
  adamw_update(p.data(), g1.data(), m.data(), v.data(), 3, hp);
  expect_all_close("p after step 1", p, std::vector<double>{0.8901996007984032, -1.93, 0.495}, 0,
                   1e-6);
  expect_all_close("m after step 1", m, std::vector<double>{0.05, -1e-4, 0.0}, 0, 1e-6);
  expect_all_close("v after step 1", v, std::vector<double>{2.5e-4, 1e-9, 0.0}, 0, 1e-6);
  hp.step = 2;
  const std::vector<float> g2 = {-0.2f, 3.0f, 0.0f};
  adamw_update(p.data(), g2.data(), m.data(), v.data(), 3, hp);
  expect_all_close("p after step 2", p,
                   std::vector<double>{0.8468275591741654, -1.9850563109881378, 0.49005}, 0, 1e-6);
  expect_all_close("m after step 2", m, std::vector<double>{0.025, 0.29991, 0.0}, 0, 1e-6);
  expect_all_close("v after step 2", v, std::vector<double>{2.8975e-4, 0.009000000999, 0.0}, 0,
                   1e-6);
}

TEST(AdamW, LargeBufferMatchesPerElementFormula) {
  // Past the chunk size and the parallel threshold, odd length, at step 5.
  Rng rng(test_seed());
  const int64_t n = 100003;
  auto p = uniform_vec(rng, n), m = uniform_vec(rng, n, -0.1f, 0.1f);
  auto v = uniform_vec(rng, n, 0.0f, 0.01f);
  const auto g = uniform_vec(rng, n);
  AdamWParams hp;
  hp.lr = 3e-4f;
  hp.weight_decay = 0.01f;
  hp.step = 5;
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) {
    const double mi = 0.9 * m[i] + 0.1 * g[i];
    const double vi = 0.999 * v[i] + 0.001 * g[i] * static_cast<double>(g[i]);
    const double mhat = mi / (1 - std::pow(0.9, 5)), vhat = vi / (1 - std::pow(0.999, 5));
    want[i] = p[i] - 3e-4 * (mhat / (std::sqrt(vhat) + 1e-8) + 0.01 * p[i]);
  }
  adamw_update(p.data(), g.data(), m.data(), v.data(), n, hp);
  // |p| <= 1, the step is ~3e-4: float rounding of p itself dominates (6e-8).
  expect_all_close("p", p, want, 2e-7, 1e-6);
}

}  // namespace
}  // namespace flotilla::kernels
