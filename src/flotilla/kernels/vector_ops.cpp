// Whole-buffer utilities used on flat gradient and parameter buffers.
#include <algorithm>
#include <cstring>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {

FLOTILLA_KERNEL double sum_squares(const float* x, int64_t n) {
  // x (n)
  // A fixed number of chunks, each summed in double, then the chunk sums added in order:
  // the result is the same for any thread count (gradient clipping then cannot make two
  // runs with different OMP_NUM_THREADS diverge).
  constexpr int64_t kChunks = 64;
  double partial[kChunks] = {};
  const int64_t chunk = (n + kChunks - 1) / kChunks;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t c = 0; c < kChunks; ++c) {
    const int64_t lo = std::min(n, c * chunk), hi = std::min(n, lo + chunk);
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = lo; i < hi; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

FLOTILLA_KERNEL void scale_inplace(float* x, int64_t n, float s) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

void zero_fill(float* x, int64_t n) {
  // In pieces of 64 KiB, spread over the threads: one thread's memset of a whole
  // gradient arena (hundreds of MiB) leaves the others waiting.
  constexpr int64_t kPiece = 1 << 14;
  const int64_t pieces = (n + kPiece - 1) / kPiece;
#pragma omp parallel for schedule(static) if (pieces > 4)
  for (int64_t p = 0; p < pieces; ++p)
    std::memset(static_cast<void*>(x + p * kPiece), 0, static_cast<size_t>(std::min(kPiece, n - p * kPiece)) * sizeof(float));
}

FLOTILLA_KERNEL void add_inplace(float* y, const float* x, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace flotilla::kernels
