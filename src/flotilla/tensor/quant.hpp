// Affine group quantization in MLX's layout (mlx.core.quantize, mode "affine"): a matrix
// W (rows, cols) is cut along each row into *groups* of `group_size` consecutive elements;
// each group g of row r has a float scale s[r, g] and bias b[r, g], and every element is
// an unsigned integer q in [0, 2^bits - 1] with  w = s * q + b.
//
// Storage (what safetensors files hold, tensor names P.weight / P.scales / P.biases):
//   packed  (rows, cols * bits / 32)  uint32, little-endian; element j of a row sits in
//           word j / (32 / bits) at bit (j % (32 / bits)) * bits (first element lowest).
//   scales  (rows, cols / group_size) float16, bfloat16 or float32 (the model's dtype).
//   biases  (rows, cols / group_size) same dtype as scales.
// Only bits 2, 4 and 8 are supported: they pack whole elements into each word (MLX's 3-
// and 6-bit formats straddle words and are refused with a clear error).
#pragma once

#include <cstddef>
#include <cstdint>

#include "flotilla/tensor/dtype.hpp"

namespace flotilla {

struct QuantFormat {
  int bits = 4;
  int64_t group_size = 64;

  int64_t per_word() const { return 32 / bits; }
  uint32_t max_q() const { return (1u << bits) - 1u; }
  friend bool operator==(const QuantFormat&, const QuantFormat&) = default;
};

inline bool quant_bits_supported(int bits) { return bits == 2 || bits == 4 || bits == 8; }

// A read-only view of one quantized matrix: pointers into a mapped file or an owned
// buffer, any alignment (words and scales are read with memcpy).
struct QuantMatrix {
  int64_t rows = 0, cols = 0;
  QuantFormat format;
  DType scale_dtype = DType::f16;       // f16, bf16 or f32
  const std::byte* packed = nullptr;    // (rows, cols * bits / 32) uint32
  const std::byte* scales = nullptr;    // (rows, cols / group_size)
  const std::byte* biases = nullptr;    // (rows, cols / group_size)

  int64_t words_per_row() const { return cols / format.per_word(); }
  int64_t groups_per_row() const { return cols / format.group_size; }
  // Bytes of the three tensors together: what the matrix costs in memory.
  int64_t bytes() const {
    return rows * words_per_row() * 4 + 2 * rows * groups_per_row() * static_cast<int64_t>(dtype_size(scale_dtype));
  }
};

}  // namespace flotilla
