// AdamW, written to reproduce torch.optim.AdamW (single-tensor path) step for step:
// the same float32 operations in the same order, with the scalar coefficients computed in
// double and rounded once, as Python floats passed to torch's kernels are.
//   param *= 1 - lr * wd                         (decay first, on the old param)
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g * g
//   param -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - beta_i^step
// which equals the header's param -= lr * (mhat / (sqrt(vhat) + eps) + wd * param) up to
// float rounding.
//
// The hyperparameters arrive as floats, but in torch they are Python doubles: 1 - 0.999f is
// 1.3e-5 (relative) away from 1 - 0.999, which would shift v, and so every update, by more
// than float rounding. Each float is therefore read back as the shortest decimal that
// round-trips it ("0.999", what the config said) and the scalar arithmetic is done on that
// double, as Python does.
#include <algorithm>
#include <charconv>
#include <cmath>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {
namespace {

struct AdamWCoefficients {
  float decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt,
      eps;
};

constexpr int64_t kChunk = 4096;

// One chunk of at most kChunk elements, in three loops. Under GCC's default -fmath-errno
// a sqrt call keeps a branch to libm (for negative inputs, which v never is) and no loop
// that contains it vectorises; neither the optimize attribute nor the pragma lifts that
// (the builtin's attributes are fixed from the command line). So only the sqrt runs
// scalar, over a small stack buffer, and the arithmetic around it stays vectorised:
// about 3x faster than one scalar loop on AVX-512.
FLOTILLA_KERNEL void adamw_chunk(float* param, const float* grad, float* m, float* v, int64_t n,
                 const AdamWCoefficients& c) {
  float root[kChunk];  // sqrt(v)
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    m[i] = m[i] * c.beta1 + c.one_minus_beta1 * g;
    v[i] = v[i] * c.beta2 + c.one_minus_beta2 * g * g;
  }
  for (int64_t i = 0; i < n; ++i) root[i] = std::sqrt(v[i]);
  for (int64_t i = 0; i < n; ++i) {
    const float p = param[i] * c.decay;
    const float denom = root[i] / c.bias_correction2_sqrt + c.eps;
    param[i] = p + -c.step_size * (m[i] / denom);
  }
}

// The double that the shortest round-tripping decimal of f denotes: 0.999f -> 0.999.
double as_decimal(float f) {
  char buf[32];
  const auto printed = std::to_chars(buf, buf + sizeof buf, f);
  double d = static_cast<double>(f);
  std::from_chars(buf, printed.ptr, d);
  return d;
}

}  // namespace

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& hp) {
  // param, grad, m, v (n)
  const double lr = as_decimal(hp.lr), beta1 = as_decimal(hp.beta1),
               beta2 = as_decimal(hp.beta2), weight_decay = as_decimal(hp.weight_decay);
  const double step = static_cast<double>(hp.step);
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const AdamWCoefficients c{
      .decay = static_cast<float>(1.0 - lr * weight_decay),
      .beta1 = hp.beta1,
      .beta2 = hp.beta2,
      .one_minus_beta1 = static_cast<float>(1.0 - beta1),
      .one_minus_beta2 = static_cast<float>(1.0 - beta2),
      .step_size = static_cast<float>(lr / bias_correction1),
      .bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2)),
      .eps = hp.eps,
  };
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t lo = ch * kChunk, len = std::min(kChunk, n - lo);
    adamw_chunk(param + lo, grad + lo, m + lo, v + lo, len, c);
  }
}

}  // namespace flotilla::kernels
