// Shared by the kernel tests: seeded random inputs and a finite-difference gradient check.
//
// Finite differences in float32 with the functional summed in double. Each kernel is
// checked on loss(x) = sum(out(x) * R) for a random R, whose gradient the backward computes
// from dout = R. Central differences with eps = 1e-3:
// - truncation error ~ eps^2 * |f'''| / 6, about 1e-7 here (smooth kernels, inputs O(1));
// - rounding: every output the perturbation touches carries ~6e-8 relative error in float,
//   summed over k touched outputs and divided by 2 * eps: ~3e-5 * sqrt(k) * |out| * |R|,
//   a few 1e-4 for the shapes used (k <= a few hundred). Outputs the perturbation does not
//   touch come out bitwise equal and cancel exactly.
// Hence the tolerance |analytic - numeric| <= 2e-3 + 1e-2 * |numeric|: ten times the noise,
// and far below the O(0.1 .. 1) error of a missing or wrong term (gradients here are O(1)).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "../test_seed.hpp"

namespace flotilla::kernels::testing {

using ::flotilla::testing::test_seed;

inline std::vector<float> uniform_vec(Rng& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::vector<float> v(n);
  rng.fill_uniform(v, lo, hi);
  return v;
}

inline double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

struct Tolerance {
  double atol;
  double rtol;
};
inline constexpr Tolerance kFiniteDifferenceTol{2e-3, 1e-2};

// Checks analytic[i] == d loss / d x[i] for every i by central differences; x is restored.
inline void expect_gradient_matches(const std::string& name, std::vector<float>& x,
                                    const std::vector<float>& analytic,
                                    const std::function<double()>& loss, double eps = 1e-3,
                                    Tolerance tol = kFiniteDifferenceTol) {
  ASSERT_EQ(x.size(), analytic.size()) << name;
  int failures = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i];
    const float xp = x0 + static_cast<float>(eps), xm = x0 - static_cast<float>(eps);
    x[i] = xp;
    const double lp = loss();
    x[i] = xm;
    const double lm = loss();
    x[i] = x0;
    const double numeric = (lp - lm) / (static_cast<double>(xp) - static_cast<double>(xm));
    const double err = std::fabs(analytic[i] - numeric);
    if (!(err <= tol.atol + tol.rtol * std::fabs(numeric))) {
      if (++failures <= 5)
        ADD_FAILURE() << name << "[" << i << "]: analytic " << analytic[i] << " vs numeric "
                      << numeric << " (|diff| " << err << ")";
    }
  }
  EXPECT_EQ(failures, 0) << name << ": " << failures << " of " << x.size()
                         << " elements outside tolerance";
}

// Elementwise |got - want| <= atol + rtol * |want|, reporting the first few mismatches.
template <typename A, typename B>
void expect_all_close(const std::string& name, const std::vector<A>& got,
                      const std::vector<B>& want, double atol, double rtol) {
  ASSERT_EQ(got.size(), want.size()) << name;
  int failures = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    if (!(std::fabs(g - w) <= atol + rtol * std::fabs(w))) {
      if (++failures <= 5)
        ADD_FAILURE() << name << "[" << i << "]: got " << g << " want " << w;
    }
  }
  EXPECT_EQ(failures, 0) << name << ": " << failures << " of " << got.size() << " mismatches";
}

}  // namespace flotilla::kernels::testing
