// RMSNorm (Llama): out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps).
// Computed in float32 like Hugging Face's LlamaRMSNorm on float32 weights.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {

FLOTILLA_KERNEL void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, float eps) {
  // out (N, C), rstd (N), inp (N, C), weight (C)
#pragma omp parallel for schedule(static) if (N * C > (1 << 14))
  for (int64_t n = 0; n < N; ++n) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < C; ++i) ss += x[i] * x[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
    rstd[n] = r;
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) y[i] = x[i] * r * weight[i];
  }
}

FLOTILLA_KERNEL void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C) {
  // dinp (N, C), dweight (C), dout (N, C), inp (N, C), weight (C), rstd (N)
  // forward: y_i = x_i * r * w_i with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / C
  //   => dx_j = r * w_j * dy_j - (r^3 / C) * x_j * sum_i(dy_i * w_i * x_i)
  if (dinp != nullptr) {
#pragma omp parallel for schedule(static) if (N * C > (1 << 14))
    for (int64_t n = 0; n < N; ++n) {
      const float* x = inp + n * C;
      const float* dy = dout + n * C;
      float* dx = dinp + n * C;
      const float r = rstd[n];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < C; ++i) dot += dy[i] * weight[i] * x[i];
      const float k = dot * r * r * r / static_cast<float>(C);
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) dx[i] += r * weight[i] * dy[i] - k * x[i];
    }
  }
  // forward: y_i = (x_i * r) * w_i  =>  dw_i += sum_n dy_i * x_i * r.
  // A sum over rows: parallelised over column ranges (each walks every row in order), so it
  // needs no per-thread partial buffers and does not depend on the thread count.
  if (dweight != nullptr) {
#pragma omp parallel if (N * C > (1 << 14))
    {
      const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      auto boundary = [&](int64_t i) { return i == nt ? C : std::min(C, (C * i / nt) / 16 * 16); };
      const int64_t c0 = boundary(t), c1 = boundary(t + 1);
      for (int64_t n = 0; n < N && c0 < c1; ++n) {
        const float* x = inp + n * C;
        const float* dy = dout + n * C;
        const float r = rstd[n];
#pragma omp simd
        for (int64_t i = c0; i < c1; ++i) dweight[i] += dy[i] * x[i] * r;
      }
    }
  }
}

}  // namespace flotilla::kernels
