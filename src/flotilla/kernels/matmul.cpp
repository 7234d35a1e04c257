// Linear layer in PyTorch's nn.Linear layout: weight (OC, C), out = inp @ weight^T + bias.
// All three products are single gemm() calls (oneDNN, gemm.hpp) on the whole batch
// (N = B*T rows), so the products are as large as the layer allows and use every thread.
#include <algorithm>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t N, int64_t C, int64_t OC) {
  // out (N, OC), inp (N, C), weight (OC, C), bias (OC) or nullptr
  if (N == 0 || OC == 0) return;
  bool accumulate = false;
  if (bias != nullptr) {
    // Broadcast the bias into out first and let the GEMM accumulate onto it (beta = 1):
    // one pass over out instead of a second pass after the GEMM.
#pragma omp parallel for schedule(static) if (N * OC > (1 << 15))
    for (int64_t n = 0; n < N; ++n) std::copy(bias, bias + OC, out + n * OC);
    accumulate = true;
  }
  if (C == 0) {
    if (bias == nullptr) std::fill(out, out + N * OC, 0.0f);
    return;
  }
  gemm(Transpose::no, Transpose::yes, N, OC, C, 1.0f, inp, C, weight, C, accumulate, out, OC);
}

void matmul_accumulate(float* out, const float* inp, const float* weight, int64_t N, int64_t C,
                       int64_t OC, float alpha) {
  // out (N, OC) +=, inp (N, C), weight (OC, C)
  if (N == 0 || OC == 0 || C == 0) return;
  gemm(Transpose::no, Transpose::yes, N, OC, C, alpha, inp, C, weight, C, true, out, OC);
}

FLOTILLA_KERNEL void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int64_t N, int64_t C, int64_t OC) {
  // dinp (N, C), dweight (OC, C), dbias (OC), dout (N, OC), inp (N, C), weight (OC, C)
  if (N == 0 || OC == 0) return;
  if (C > 0) {
    // forward: out = inp @ weight^T  =>  dinp += dout @ weight  (N, OC) x (OC, C)
    if (dinp != nullptr)
      gemm(Transpose::no, Transpose::no, N, C, OC, 1.0f, dout, OC, weight, C, true, dinp, C);
    // and dweight += dout^T @ inp  (OC, N) x (N, C)
    if (dweight != nullptr)
      gemm(Transpose::yes, Transpose::no, OC, C, N, 1.0f, dout, OC, inp, C, true, dweight, C);
  }
  if (dbias != nullptr) {
    // forward: out += bias (broadcast over rows)  =>  dbias += sum over rows of dout.
    // Each thread owns a block of columns and walks all rows in order: contiguous inner loop,
    // no reduction across threads, and the result does not depend on the thread count.
    constexpr int64_t kCols = 256;
    const int64_t nblocks = (OC + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (N * OC > (1 << 15))
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t j0 = blk * kCols, j1 = std::min(OC, j0 + kCols);
      float acc[kCols] = {};
      for (int64_t r = 0; r < N; ++r) {
        const float* row = dout + r * OC;
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += row[j];
      }
      for (int64_t j = j0; j < j1; ++j) dbias[j] += acc[j - j0];
    }
  }
}

}  // namespace flotilla::kernels
