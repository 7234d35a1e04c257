// Softmax cross-entropy over the vocabulary, one row per token, rows in parallel.
// Stable: every exp is of (logit - row max) <= 0. The backward recomputes the softmax from
// the logits (the forward keeps nothing but the losses) and writes the gradient over the
// logits, so the largest activation of the model (N, V) is never held twice.
#include <algorithm>
#include <cmath>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/kernels/vec_math.hpp"

namespace flotilla::kernels {
namespace {

FLOTILLA_KERNEL float row_max(const float* x, int64_t V) {
  float mx = x[0];
  // A conditional, not std::max: GCC 12 vectorises the std::max form ~10x slower.
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < V; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

}  // namespace

FLOTILLA_KERNEL int64_t cross_entropy_forward(float* losses, const float* logits, const int32_t* targets,
                              int64_t N, int64_t V, int32_t ignore_index) {
  // losses (N), logits (N, V), targets (N)
  int64_t count = 0;
#pragma omp parallel for schedule(static) reduction(+ : count) if (N * V > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] == ignore_index) {
      losses[n] = 0.0f;
      continue;
    }
    const float* x = logits + n * V;
    const float mx = row_max(x, V);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) sum += detail::exp_approx(x[j] - mx);
    // -log softmax(x)[t] = log(sum_j exp(x_j - mx)) - (x_t - mx)
    losses[n] = std::log(sum) - (x[targets[n]] - mx);
    ++count;
  }
  return count;
}

FLOTILLA_KERNEL void cross_entropy_backward_inplace(float* logits, const int32_t* targets, int64_t N, int64_t V,
                                    int32_t ignore_index, float dloss_scale) {
  // logits (N, V) in place -> dlogits, targets (N)
  // forward: loss = logsumexp(x) - x_t  =>  dx = dloss_scale * (softmax(x) - onehot(t))
#pragma omp parallel for schedule(static) if (N * V > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    float* x = logits + n * V;
    if (targets[n] == ignore_index) {
      std::fill(x, x + V, 0.0f);
      continue;
    }
    const float mx = row_max(x, V);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      const float e = detail::exp_approx(x[j] - mx);
      x[j] = e;
      sum += e;
    }
    const float k = dloss_scale / sum;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) x[j] *= k;
    x[targets[n]] -= dloss_scale;
  }
}

}  // namespace flotilla::kernels
