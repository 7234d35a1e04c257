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

FLOTILLA_KERNEL float row_max_of_slice(const float* x, int64_t V) {
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
    const float mx = row_max_of_slice(x, V);
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
    const float mx = row_max_of_slice(x, V);
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

FLOTILLA_KERNEL void cross_entropy_slice_max(float* row_max, const float* logits, int64_t N, int64_t V) {
  // row_max (N), logits (N, V)
#pragma omp parallel for schedule(static) if (N * V > (1 << 15))
  for (int64_t n = 0; n < N; ++n) row_max[n] = row_max_of_slice(logits + n * V, V);
}

FLOTILLA_KERNEL void cross_entropy_slice_sums(float* sum_exp, float* target_logit, const float* logits,
                                              const float* row_max, const int32_t* targets, int64_t N, int64_t V,
                                              int64_t vocab_begin, int32_t ignore_index) {
  // sum_exp (N), target_logit (N), logits (N, V), row_max (N), targets (N)
#pragma omp parallel for schedule(static) if (N * V > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    sum_exp[n] = target_logit[n] = 0.0f;
    if (targets[n] == ignore_index) continue;
    const float* x = logits + n * V;
    const float mx = row_max[n];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) sum += detail::exp_approx(x[j] - mx);
    sum_exp[n] = sum;
    const int64_t t = static_cast<int64_t>(targets[n]) - vocab_begin;
    if (t >= 0 && t < V) target_logit[n] = x[t] - mx;
  }
}

FLOTILLA_KERNEL void cross_entropy_slice_backward_inplace(float* logits, const float* row_max, const float* sum_exp,
                                                          const int32_t* targets, int64_t N, int64_t V,
                                                          int64_t vocab_begin, int32_t ignore_index,
                                                          float dloss_scale) {
  // logits (N, V) in place -> dlogits, row_max (N), sum_exp (N), targets (N)
#pragma omp parallel for schedule(static) if (N * V > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    float* x = logits + n * V;
    if (targets[n] == ignore_index) {
      std::fill(x, x + V, 0.0f);
      continue;
    }
    const float mx = row_max[n];
    const float k = dloss_scale / sum_exp[n];
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) x[j] = detail::exp_approx(x[j] - mx) * k;
    const int64_t t = static_cast<int64_t>(targets[n]) - vocab_begin;
    if (t >= 0 && t < V) x[t] -= dloss_scale;
  }
}

}  // namespace flotilla::kernels
