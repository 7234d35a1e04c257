// Token embedding lookup. The backward is a scatter-add (several rows may share a token), so
// it is parallelised over columns of C, never over rows: each thread owns a range of columns
// of every embedding row and adds the rows of dout into it in order n = 0..N-1. No atomics,
// no per-thread copies of dwte, and each element of dwte sees the same additions in the same
// order whatever the thread count: the result is bitwise reproducible.
#include <omp.h>

#include <algorithm>

#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {

void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C) {
  // out (N, C), tokens (N), wte (V, C)
#pragma omp parallel for schedule(static) if (N * C > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    const float* src = wte + static_cast<int64_t>(tokens[n]) * C;
    std::copy(src, src + C, out + n * C);
  }
}

void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t N,
                        int64_t C) {
  // dwte (V, C), dout (N, C), tokens (N)
#pragma omp parallel if (N * C > (1 << 15))
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    // Range boundaries on 16-float (64-byte) multiples: two threads never write one cache line.
    auto boundary = [&](int64_t i) { return i == nt ? C : std::min(C, (C * i / nt) / 16 * 16); };
    const int64_t c0 = boundary(t), c1 = boundary(t + 1);
    for (int64_t n = 0; n < N && c0 < c1; ++n) {
      float* dst = dwte + static_cast<int64_t>(tokens[n]) * C;
      const float* src = dout + n * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

void embedding_forward_rows(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C,
                            int64_t row_begin, int64_t row_end) {
  // out (N, C), tokens (N), wte (row_end - row_begin, C)
#pragma omp parallel for schedule(static) if (N * C > (1 << 15))
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = static_cast<int64_t>(tokens[n]);
    if (row < row_begin || row >= row_end) {
      std::fill(out + n * C, out + (n + 1) * C, 0.0f);
      continue;
    }
    const float* src = wte + (row - row_begin) * C;
    std::copy(src, src + C, out + n * C);
  }
}

void embedding_backward_rows(float* dwte, const float* dout, const int32_t* tokens, int64_t N, int64_t C,
                             int64_t row_begin, int64_t row_end) {
  // dwte (row_end - row_begin, C), dout (N, C), tokens (N); as embedding_backward: each
  // thread owns a range of columns, rows added in order n = 0..N-1.
#pragma omp parallel if (N * C > (1 << 15))
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    auto boundary = [&](int64_t i) { return i == nt ? C : std::min(C, (C * i / nt) / 16 * 16); };
    const int64_t c0 = boundary(t), c1 = boundary(t + 1);
    for (int64_t n = 0; n < N && c0 < c1; ++n) {
      const int64_t row = static_cast<int64_t>(tokens[n]);
      if (row < row_begin || row >= row_end) continue;
      float* dst = dwte + (row - row_begin) * C;
      const float* src = dout + n * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace flotilla::kernels
