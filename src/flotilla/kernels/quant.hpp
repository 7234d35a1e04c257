// Affine group quantization kernels (MLX's layout, see tensor/quant.hpp): quantize and
// dequantize rows, and the linear-layer products computed straight from packed weights.
//
// The products never materialise the whole float matrix: W is dequantized a *tile* of
// output rows at a time into a small scratch buffer (at most kQuantTileFloats floats) and
// each tile goes through one gemm() (oneDNN). For a few rows of input (KV-cache
// decoding) a fused kernel multiplies the packed weights into the inputs directly, bound by
// reading the packed bytes once (qmatmul_rows_fused below).
#pragma once

#include <cstddef>
#include <cstdint>

#include "flotilla/kernels/gemm.hpp"
#include "flotilla/tensor/quant.hpp"

namespace flotilla::kernels {

inline constexpr int64_t kQuantTileFloats = int64_t{1} << 20;  // 4 MiB of scratch per tile

// q (cols) in [0, 2^bits) <-> words (cols * bits / 32). cols must be a multiple of 32/bits.
void pack_row(const uint8_t* q, int64_t cols, int bits, uint32_t* words);
void unpack_row(const uint32_t* words, int64_t cols, int bits, uint8_t* q);

// Quantizes w (rows, cols) group by group: bias = min of the group (rounded to
// scale_dtype), scale = (max - bias) / (2^bits - 1) rounded *up* to scale_dtype, so the
// top of the range stays representable, q = round((w - bias) / scale) clamped. Then
//   |w - (scale * q + bias)| <= scale / 2 + |min - bias|,
// the second term being half a unit in the last place of bias in scale_dtype (0 for f32).
// packed (rows, cols*bits/32) uint32, scales and biases (rows, cols/group_size) in
// scale_dtype (f16, bf16 or f32). cols % group_size == 0, group_size % (32/bits) == 0.
void quantize_rows(const float* w, int64_t rows, int64_t cols, QuantFormat format, DType scale_dtype,
                   uint32_t* packed, std::byte* scales, std::byte* biases);

// out (nrows, cols) = rows row0 .. row0+nrows-1 of m, dequantized.
void dequantize_rows(const QuantMatrix& m, int64_t row0, int64_t nrows, float* out);

// out = inp @ W^T + bias    out (N, OC), inp (N, C), W = m (OC, C), bias (OC) or nullptr.
// input == bf16: the tiles are dequantized into bf16 and inp rounded to bf16, float32
// accumulation (needs gemm_bf16_supported()); the few-row path stays float32 (it is bound
// by reading the packed bytes, not by arithmetic).
void qmatmul_forward(float* out, const float* inp, const QuantMatrix& m, const float* bias, int64_t N,
                     GemmInput input = GemmInput::f32);
// The few-row products qmatmul_forward chooses between for N <= kQuantFewRows (decoding),
// same arguments and result (float rounding apart):
// - fused: the packed weights are multiplied into the inputs group by group, without a
//   float copy of any weight row: s * sum_j q_j x_j + b * sum_j x_j per group, the input's
//   group sums computed once per call. Needs qmatmul_fused_supported(m): cols a multiple
//   of 8 words (64 weights at 4 bits, 32 at 8) and 8 words a multiple or a divisor of a group.
// - dequantized: each weight row dequantized to floats in L1, then dotted with the inputs
//   (the path before the fused one; the reference it is tested and benchmarked against).
inline constexpr int64_t kQuantFewRows = 4;
bool qmatmul_fused_supported(const QuantMatrix& m);
void qmatmul_rows_fused(float* out, const float* inp, const QuantMatrix& m, const float* bias, int64_t N);
void qmatmul_rows_dequantized(float* out, const float* inp, const QuantMatrix& m, const float* bias, int64_t N);

// dinp += dout @ W          dinp (N, C), dout (N, OC). W is frozen: no weight gradient.
void qmatmul_backward_input(float* dinp, const float* dout, const QuantMatrix& m, int64_t N,
                            GemmInput input = GemmInput::f32);

// out[n, :] = W[tokens[n], :]   out (N, C), tokens (N) in [0, rows). Only looked-up rows
// are dequantized.
void qembedding_forward(float* out, const int32_t* tokens, const QuantMatrix& m, int64_t N);
// The vocabulary-parallel lookup (embedding_forward_rows): m holds rows [row_begin, row_end)
// of the whole table; a token outside them gives a zero row. out (N, C), tokens (N).
void qembedding_forward_rows(float* out, const int32_t* tokens, const QuantMatrix& m, int64_t N, int64_t row_begin,
                             int64_t row_end);

}  // namespace flotilla::kernels
