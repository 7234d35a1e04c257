// Linear layer in PyTorch's nn.Linear layout: weight (OC, C), out = inp @ weight^T + bias.
// All three products are single gemm() calls (oneDNN, gemm.hpp) on the whole batch
// (N = B*T rows), so the products are as large as the layer allows and use every thread.
#include <algorithm>

#include "flotilla/base/buffer.hpp"

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {

namespace {

// Broadcasts the bias into out (N, OC) so that the GEMM accumulates onto it (beta = 1): one
// pass over out instead of a second pass after the GEMM. Returns whether out now holds
// something to accumulate onto; with C == 0 it also finishes out.
bool start_forward(float* out, const float* bias, int64_t N, int64_t C, int64_t OC) {
  if (bias != nullptr) {
#pragma omp parallel for schedule(static) if (N * OC > (1 << 15))
    for (int64_t n = 0; n < N; ++n) std::copy(bias, bias + OC, out + n * OC);
  } else if (C == 0) {
    std::fill(out, out + N * OC, 0.0f);
  }
  return bias != nullptr;
}

// Per-thread bf16 copies of a product's float inputs, grown on demand and kept: a step
// converts the same shapes again and again.
struct Bf16Scratch {
  Buffer<uint16_t> a, b;
  static uint16_t* fill(Buffer<uint16_t>& buf, const float* x, int64_t n) {
    if (static_cast<size_t>(n) > buf.size()) buf.resize(static_cast<size_t>(n));
    convert_to_bf16(x, n, buf.data());
    return buf.data();
  }
};
thread_local Bf16Scratch bf16_scratch;

}  // namespace

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t N, int64_t C, int64_t OC) {
  // out (N, OC), inp (N, C), weight (OC, C), bias (OC) or nullptr
  if (N == 0 || OC == 0) return;
  const bool accumulate = start_forward(out, bias, N, C, OC);
  if (C == 0) return;
  gemm(Transpose::no, Transpose::yes, N, OC, C, 1.0f, inp, C, weight, C, accumulate, out, OC);
}

void matmul_forward_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias, int64_t N,
                         int64_t C, int64_t OC) {
  // out (N, OC), inp (N, C) float rounded to bf16 here, weight (OC, C) bf16, bias (OC) or nullptr
  if (N == 0 || OC == 0) return;
  const bool accumulate = start_forward(out, bias, N, C, OC);
  if (C == 0) return;
  const uint16_t* x = Bf16Scratch::fill(bf16_scratch.a, inp, N * C);
  gemm_bf16(Transpose::no, Transpose::yes, N, OC, C, 1.0f, x, C, weight, C, accumulate, out, OC);
}

void matmul_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const uint16_t* weight, int64_t N, int64_t C, int64_t OC) {
  // As matmul_backward, with dout, inp and weight rounded to bf16 for the two products;
  // dbias sums dout in float32.
  if (N == 0 || OC == 0) return;
  if (C > 0 && (dinp != nullptr || dweight != nullptr)) {
    const uint16_t* g = Bf16Scratch::fill(bf16_scratch.a, dout, N * OC);
    if (dinp != nullptr)
      gemm_bf16(Transpose::no, Transpose::no, N, C, OC, 1.0f, g, OC, weight, C, true, dinp, C);
    if (dweight != nullptr) {
      const uint16_t* x = Bf16Scratch::fill(bf16_scratch.b, inp, N * C);
      gemm_bf16(Transpose::yes, Transpose::no, OC, C, N, 1.0f, g, OC, x, C, true, dweight, C);
    }
  }
  if (dbias != nullptr) matmul_backward(nullptr, nullptr, dbias, dout, inp, nullptr, N, C, OC);
}

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t C,
                    int64_t OC, GemmInput input) {
  if (input == GemmInput::f32 || N == 0 || OC == 0) return matmul_forward(out, inp, weight, bias, N, C, OC);
  Buffer<uint16_t> w(static_cast<size_t>(OC * C));
  convert_to_bf16(weight, OC * C, w.data());
  matmul_forward_bf16(out, inp, w.data(), bias, N, C, OC);
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC, GemmInput input) {
  if (input == GemmInput::f32 || N == 0 || OC == 0)
    return matmul_backward(dinp, dweight, dbias, dout, inp, weight, N, C, OC);
  Buffer<uint16_t> w(static_cast<size_t>(dinp != nullptr ? OC * C : 0));
  if (dinp != nullptr) convert_to_bf16(weight, OC * C, w.data());
  matmul_backward_bf16(dinp, dweight, dbias, dout, inp, w.data(), N, C, OC);
}

void matmul_accumulate(float* out, const float* inp, const float* weight, int64_t N, int64_t C, int64_t OC,
                       float alpha, GemmInput input) {
  if (input == GemmInput::f32) return matmul_accumulate(out, inp, weight, N, C, OC, alpha);
  if (N == 0 || OC == 0 || C == 0) return;
  const uint16_t* x = Bf16Scratch::fill(bf16_scratch.a, inp, N * C);
  const uint16_t* w = Bf16Scratch::fill(bf16_scratch.b, weight, OC * C);
  gemm_bf16(Transpose::no, Transpose::yes, N, OC, C, alpha, x, C, w, C, true, out, OC);
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
