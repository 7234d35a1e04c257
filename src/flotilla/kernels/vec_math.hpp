// Private to kernels/: scalar math written so that GCC vectorises the loops that call it.
// glibc's expf is an opaque call that the compiler will not vectorise without -ffast-math
// (libmvec's vector variants are only declared under __FAST_MATH__), and softmax/silu spend
// one exp per element: in causal attention that is one exp per 2*hd GEMM flops, so a scalar
// expf would cost about as much as the GEMMs themselves.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace flotilla::kernels::detail {

// exp(x) for float, max relative error about 2 ulp on [-87, 88] (Cephes expf polynomial with
// a Cody-Waite split of ln 2). Inputs are clamped: below -87.3 it returns ~1e-38 instead of
// a denormal or 0, above 88.3 it returns ~2e38 instead of inf; both are harmless for softmax
// (arguments <= 0 after subtracting the row max) and for sigmoid (1 / (1 + exp(-x))).
// Branch-free, no calls: GCC turns a loop of these into AVX-512 code.
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // k = round(x / ln 2) by the 1.5 * 2^23 trick: std::floor/nearbyint do not vectorise
  // under the default -ftrapping-math, and any rounding works for the reduction.
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - k * 0.693359375f;  // ln 2 split into an exact high part and a small low part
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // 2^k by building the exponent field; k in [-126, 127] thanks to the clamp above.
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return y * std::bit_cast<float>(bits);
}

}  // namespace flotilla::kernels::detail
