// Inverted dropout with a mask that is a pure function of (seed, index): a splitmix64 hash
// of the two, compared against the keep probability. Backward recomputes the mask instead
// of storing N x C bytes per adapted layer.
#include <cstdint>

#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {
namespace {
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// keep with probability 1 - p: the top 24 bits of the hash as a uniform in [0, 1).
inline bool keep(uint64_t seed, int64_t i, uint32_t threshold) {
  return static_cast<uint32_t>(mix(seed + 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(i + 1)) >> 40) >= threshold;
}
}  // namespace

void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed) {
  const auto threshold = static_cast<uint32_t>(static_cast<double>(p) * 16777216.0);
  const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) out[i] = keep(seed, i, threshold) ? inp[i] * scale : 0.0f;
}

void dropout_backward(float* dinp, const float* dout, int64_t n, float p, uint64_t seed) {
  const auto threshold = static_cast<uint32_t>(static_cast<double>(p) * 16777216.0);
  const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i)
    if (keep(seed, i, threshold)) dinp[i] += dout[i] * scale;
}

void dropout_forward_columns(float* out, const float* inp, int64_t rows, int64_t cols, int64_t full_cols,
                             int64_t first, float p, uint64_t seed) {
  const auto threshold = static_cast<uint32_t>(static_cast<double>(p) * 16777216.0);
  const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 15))
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      out[i * cols + j] = keep(seed, i * full_cols + first + j, threshold) ? inp[i * cols + j] * scale : 0.0f;
}

void dropout_backward_columns(float* dinp, const float* dout, int64_t rows, int64_t cols, int64_t full_cols,
                              int64_t first, float p, uint64_t seed) {
  const auto threshold = static_cast<uint32_t>(static_cast<double>(p) * 16777216.0);
  const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 15))
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      if (keep(seed, i * full_cols + first + j, threshold)) dinp[i * cols + j] += dout[i * cols + j] * scale;
}

}  // namespace flotilla::kernels
