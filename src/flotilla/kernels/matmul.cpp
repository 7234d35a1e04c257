// Linear layer in PyTorch's nn.Linear layout: weight (OC, C), out = inp @ weight^T + bias.
// All three products are single OpenBLAS calls on the whole batch (N = B*T rows), so the
// GEMMs are as large as the layer allows and OpenBLAS uses every thread.
#include <cblas.h>

#include <algorithm>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t N, int64_t C, int64_t OC) {
  // out (N, OC), inp (N, C), weight (OC, C), bias (OC) or nullptr
  if (N == 0 || OC == 0) return;
  float beta = 0.0f;
  if (bias != nullptr) {
    // Broadcast the bias into out first and let the GEMM accumulate onto it (beta = 1):
    // one pass over out instead of a second pass after the GEMM.
#pragma omp parallel for schedule(static) if (N * OC > (1 << 15))
    for (int64_t n = 0; n < N; ++n) std::copy(bias, bias + OC, out + n * OC);
    beta = 1.0f;
  }
  if (C == 0) {
    if (bias == nullptr) std::fill(out, out + N * OC, 0.0f);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(N), static_cast<int>(OC),
              static_cast<int>(C), 1.0f, inp, static_cast<int>(C), weight, static_cast<int>(C),
              beta, out, static_cast<int>(OC));
}

void matmul_accumulate(float* out, const float* inp, const float* weight, int64_t N, int64_t C,
                       int64_t OC, float alpha) {
  // out (N, OC) +=, inp (N, C), weight (OC, C)
  if (N == 0 || OC == 0 || C == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(N), static_cast<int>(OC),
              static_cast<int>(C), alpha, inp, static_cast<int>(C), weight, static_cast<int>(C), 1.0f,
              out, static_cast<int>(OC));
}

FLOTILLA_KERNEL void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int64_t N, int64_t C, int64_t OC) {
  // dinp (N, C), dweight (OC, C), dbias (OC), dout (N, OC), inp (N, C), weight (OC, C)
  if (N == 0 || OC == 0) return;
  const int n = static_cast<int>(N), c = static_cast<int>(C), oc = static_cast<int>(OC);
  if (C > 0) {
    // forward: out = inp @ weight^T  =>  dinp += dout @ weight  (N, OC) x (OC, C)
    if (dinp != nullptr)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, c, oc, 1.0f, dout, oc, weight, c,
                  1.0f, dinp, c);
    // and dweight += dout^T @ inp  (OC, N) x (N, C)
    if (dweight != nullptr)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, oc, c, n, 1.0f, dout, oc, inp, c, 1.0f,
                  dweight, c);
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
