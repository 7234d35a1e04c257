// Affine group quantization: see quant.hpp for the format and the error bound.
#include "flotilla/kernels/quant.hpp"


#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/gemm.hpp"

namespace flotilla::kernels {
namespace {

inline uint32_t load_word(const std::byte* p, int64_t i) {
  uint32_t w;
  std::memcpy(&w, p + i * 4, 4);
  return w;
}

// n scale-dtype values (f16, bf16 or f32) at src as floats. Inline rather than
// convert_to_f32: that one opens an OpenMP region (for large tensors), and an OpenMP region
// opened inside another one costs two futex system calls even when it runs on one thread,
// 2.3 us of CPU per call measured on the dev machine (a paravirtualised guest). Once per
// weight row, that was most of a quantized decode step. Every value converts exactly.
inline void params_to_f32(DType dt, const std::byte* src, int64_t n, float* dst) {
  if (dt == DType::f32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else if (dt == DType::f16) {
    for (int64_t i = 0; i < n; ++i) {
#if defined(__FLT16_MAX__)
      _Float16 h;  // F16C's vcvtph2ps where the target has it (x86-64-v3 does)
      std::memcpy(&h, src + 2 * i, 2);
      dst[i] = static_cast<float>(h);
#else
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      dst[i] = f16_to_f32(h);
#endif
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      dst[i] = bf16_to_f32(h);
    }
  }
}

// A row's scales and biases as floats into s and b (groups_per_row floats each).
void load_row_params(const QuantMatrix& m, int64_t r, float* s, float* b) {
  const int64_t G = m.groups_per_row();
  const int64_t esz = static_cast<int64_t>(dtype_size(m.scale_dtype));
  params_to_f32(m.scale_dtype, m.scales + r * G * esz, G, s);
  params_to_f32(m.scale_dtype, m.biases + r * G * esz, G, b);
}

// One row of m into out (cols). s, b: scratch of groups_per_row floats each.
template <int kBits>
FLOTILLA_KERNEL void dequantize_row_bits(const QuantMatrix& m, int64_t r, float* out, float* s, float* b) {
  constexpr int kPerWord = 32 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  load_row_params(m, r, s, b);
  const int64_t words_per_group = m.format.group_size / kPerWord;
  const std::byte* row = m.packed + r * m.words_per_row() * 4;
  const int64_t G = m.groups_per_row();
  for (int64_t g = 0; g < G; ++g) {
    const float scale = s[g], bias = b[g];
    for (int64_t wi = g * words_per_group; wi < (g + 1) * words_per_group; ++wi) {
      const uint32_t word = load_word(row, wi);
      float* o = out + wi * kPerWord;
#pragma omp simd
      for (int i = 0; i < kPerWord; ++i) o[i] = scale * static_cast<float>((word >> (i * kBits)) & kMask) + bias;
    }
  }
}

FLOTILLA_KERNEL void dequantize_row(const QuantMatrix& m, int64_t r, float* out, float* s, float* b) {
  switch (m.format.bits) {
    case 2: dequantize_row_bits<2>(m, r, out, s, b); break;
    case 4: dequantize_row_bits<4>(m, r, out, s, b); break;
    default: dequantize_row_bits<8>(m, r, out, s, b); break;
  }
}

// Per-thread scratch for one row's scales and biases.
struct RowScratch {
  std::vector<float> s, b;
  explicit RowScratch(const QuantMatrix& m)
      : s(static_cast<size_t>(m.groups_per_row())), b(static_cast<size_t>(m.groups_per_row())) {}
};

// Stores x in `dt` at dst[i]; `up` rounds towards +inf (for scales, so that the range
// bias + (2^bits - 1) * scale still reaches the group's maximum).
float store_param(DType dt, std::byte* dst, int64_t i, float x, bool up) {
  if (dt == DType::f32) {
    std::memcpy(dst + i * 4, &x, 4);
    return x;
  }
  uint16_t h = dt == DType::f16 ? f32_to_f16(x) : f32_to_bf16(x);
  auto to_f32 = [&](uint16_t v) { return dt == DType::f16 ? f16_to_f32(v) : bf16_to_f32(v); };
  // Positive finite values: the next representable one is the next bit pattern.
  if (up && x > 0.0f && to_f32(h) < x) ++h;
  std::memcpy(dst + i * 2, &h, 2);
  return to_f32(h);
}

// Up to kQuantFewRows input rows the few-row path (fused, or a weight row at a time) beats
// the tile + SGEMM one; by 16 rows the tile + SGEMM is ahead (measured with the
// row-at-a-time path on a 4096 x 4096 matrix: 1.8 vs 2.2 G weight-rows/s).
constexpr int64_t kRowPathMaxRows = kQuantFewRows;

int64_t tile_rows(int64_t C) { return std::clamp<int64_t>(kQuantTileFloats / std::max<int64_t>(C, 1), 16, 1024); }

}  // namespace

void pack_row(const uint8_t* q, int64_t cols, int bits, uint32_t* words) {
  const int64_t per_word = 32 / bits;
  for (int64_t w = 0; w < cols / per_word; ++w) {
    uint32_t word = 0;
    for (int64_t i = 0; i < per_word; ++i) word |= static_cast<uint32_t>(q[w * per_word + i]) << (i * bits);
    words[w] = word;
  }
}

void unpack_row(const uint32_t* words, int64_t cols, int bits, uint8_t* q) {
  const int64_t per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t j = 0; j < cols; ++j)
    q[j] = static_cast<uint8_t>((words[j / per_word] >> ((j % per_word) * bits)) & mask);
}

FLOTILLA_KERNEL void quantize_rows(const float* w, int64_t rows, int64_t cols, QuantFormat format, DType scale_dtype,
                   uint32_t* packed, std::byte* scales, std::byte* biases) {
  // w (rows, cols); packed (rows, cols*bits/32); scales, biases (rows, cols/group_size)
  const int64_t gs = format.group_size, G = cols / gs, W = cols / format.per_word();
  const float max_q = static_cast<float>(format.max_q());
#pragma omp parallel if (rows * cols > (1 << 16))
  {
    std::vector<uint8_t> q(static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = w + r * cols;
      for (int64_t g = 0; g < G; ++g) {
        const float* x = row + g * gs;
        const auto [lo, hi] = std::minmax_element(x, x + gs);
        const float bias = store_param(scale_dtype, biases, r * G + g, *lo, false);
        const float scale = store_param(scale_dtype, scales, r * G + g, std::max(*hi - bias, 0.0f) / max_q, true);
        const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        for (int64_t j = 0; j < gs; ++j) {
          const float v = std::nearbyint((x[j] - bias) * inv);
          q[static_cast<size_t>(g * gs + j)] = static_cast<uint8_t>(std::clamp(v, 0.0f, max_q));
        }
      }
      pack_row(q.data(), cols, format.bits, packed + r * W);
    }
  }
}

FLOTILLA_KERNEL void dequantize_rows(const QuantMatrix& m, int64_t row0, int64_t nrows, float* out) {
  // out (nrows, cols)
#pragma omp parallel if (nrows * m.cols > (1 << 15))
  {
    RowScratch sc(m);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < nrows; ++r) dequantize_row(m, row0 + r, out + r * m.cols, sc.s.data(), sc.b.data());
  }
}

namespace {

// out (nrows, cols) bf16 = rows row0 .. row0+nrows-1 of m: each row dequantized into float
// in L1, then rounded to bf16 (the tile a bf16 product reads is half the float one's bytes).
FLOTILLA_KERNEL void dequantize_rows_bf16(const QuantMatrix& m, int64_t row0, int64_t nrows, uint16_t* out) {
#pragma omp parallel if (nrows * m.cols > (1 << 15))
  {
    RowScratch sc(m);
    std::vector<float> row(static_cast<size_t>(m.cols));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < nrows; ++r) {
      dequantize_row(m, row0 + r, row.data(), sc.s.data(), sc.b.data());
      uint16_t* dst = out + r * m.cols;
      for (int64_t c = 0; c < m.cols; ++c) dst[c] = f32_to_bf16(row[static_cast<size_t>(c)]);
    }
  }
}

// fn(r0, nr, tile) for each run of at most tile_rows(C) rows [r0, r0 + nr) of m, the run
// dequantized into `tile` (nr, C): float, or bf16 as uint16_t. One buffer serves every run.
template <class Elem, class Fn>
void for_each_tile(const QuantMatrix& m, Fn&& fn) {
  const int64_t R = tile_rows(m.cols);
  std::vector<Elem> tile(static_cast<size_t>(std::min(R, m.rows) * m.cols));
  for (int64_t r0 = 0; r0 < m.rows; r0 += R) {
    const int64_t nr = std::min(R, m.rows - r0);
    if constexpr (std::is_same_v<Elem, float>) dequantize_rows(m, r0, nr, tile.data());
    else dequantize_rows_bf16(m, r0, nr, tile.data());
    fn(r0, nr, static_cast<const Elem*>(tile.data()));
  }
}

}  // namespace

namespace {

// ---- The fused few-row product (decoding) ----
//
// Vocabulary. A *word* is one uint32 of a packed row: kPerWord = 32 / bits weights, weight
// j of the row in word j / kPerWord at bit (j % kPerWord) * bits. A *group* is group_size
// weights sharing one scale s and bias b. A *unit* is kUnitWords = 8 consecutive words of a
// row, the width of one AVX2 vector of words: its lane k holds word k, and the weights at
// one bit position (the *plane* i) of the eight words are the row's weights 8u*kPerWord +
// k*kPerWord + i. The input rows are rearranged once per call into the same planes (the
// *planar input*), so that plane i of a unit is one contiguous load of 8 floats.
//
// Per group, sum_j (s q_j + b) x_j = s * sum_j q_j x_j + b * sum_j x_j: each lane
// accumulates q * x over the planes of a unit, the lane's scale multiplies that partial sum
// once per unit, and the bias meets the group's input sum, computed once per input row and
// shared by every output row. kRowBlock output rows go through a unit together, so each
// plane of the input is loaded once for all of them.
//
// The lanes and the order of every sum are written out, so each output is the same float in
// the AVX2 and AVX-512 variants and for any thread count (each output row is one thread's).

constexpr int64_t kUnitWords = 8;
constexpr int kRowBlock = 4;
// One unit's lanes as GCC vector types (not intrinsics: each variant lowers them to its own
// instructions; the loops over plain arrays were left scalar by the vectoriser).
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef int32_t I32x8 __attribute__((vector_size(32)));
typedef float F32x8 __attribute__((vector_size(32)));

// Planar input: xp (N, C) with xp[n][u*8*kPerWord + i*8 + k] = x[n][(8u + k)*kPerWord + i];
// xsum (N, G) the group sums of x. C is a multiple of 8 * kPerWord.
template <int kBits>
void make_planar_input(const float* x, int64_t N, int64_t C, int64_t group_size, float* xp, float* xsum) {
  constexpr int kPerWord = 32 / kBits;
  constexpr int64_t kUnitWeights = kUnitWords * kPerWord;
  const int64_t G = C / group_size;
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    float* pr = xp + n * C;
    for (int64_t u = 0; u < C / kUnitWeights; ++u)
      for (int i = 0; i < kPerWord; ++i)
        for (int64_t k = 0; k < kUnitWords; ++k)
          pr[u * kUnitWeights + i * kUnitWords + k] = xr[(u * kUnitWords + k) * kPerWord + i];
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0.0f;
      for (int64_t j = 0; j < group_size; ++j) sum += xr[g * group_size + j];
      xsum[n * G + g] = sum;
    }
  }
}

// out[n * OC + o0 + r] for r < kRows, n < N: rows o0 .. o0+kRows-1 of m against the
// planar inputs. word_group (words_per_row): each word's group. s, b: scratch of kRows * G
// floats.
template <int kBits, int kRows>
FLOTILLA_KERNEL void fused_row_block(const QuantMatrix& m, int64_t o0, const float* xp, const float* xsum,
                                     const int32_t* word_group, int64_t N, float* out, int64_t OC, float* s, float* b) {
  constexpr int kPerWord = 32 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  constexpr int64_t kUnitWeights = kUnitWords * kPerWord;
  const int64_t C = m.cols, G = m.groups_per_row(), Wr = m.words_per_row();
  const bool one_group_per_unit = (m.format.group_size / kPerWord) % kUnitWords == 0;
  const std::byte* rows[kRows];
  for (int r = 0; r < kRows; ++r) {
    load_row_params(m, o0 + r, s + r * G, b + r * G);
    rows[r] = m.packed + (o0 + r) * Wr * 4;
  }
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = xp + n * C;
    F32x8 total[kRows] = {};
    for (int64_t u = 0; u < Wr / kUnitWords; ++u) {
      const int32_t* ug = word_group + u * kUnitWords;
      const float* xu = xn + u * kUnitWeights;
      U32x8 w[kRows];
      for (int r = 0; r < kRows; ++r) std::memcpy(&w[r], rows[r] + u * kUnitWords * 4, sizeof(U32x8));
      F32x8 acc[kRows] = {};
#pragma GCC unroll 16
      for (int i = 0; i < kPerWord; ++i) {
        F32x8 xv;
        std::memcpy(&xv, xu + i * kUnitWords, sizeof(F32x8));
        for (int r = 0; r < kRows; ++r)
          acc[r] += __builtin_convertvector(reinterpret_cast<I32x8>((w[r] >> (i * kBits)) & kMask), F32x8) * xv;
      }
      for (int r = 0; r < kRows; ++r) {
        // A unit lies inside one group (one scale for its lanes), or holds several whole ones.
        F32x8 scale;
        if (one_group_per_unit) {
          scale = F32x8{} + s[r * G + ug[0]];
        } else {
          for (int k = 0; k < kUnitWords; ++k) scale[k] = s[r * G + ug[k]];
        }
        total[r] += scale * acc[r];
      }
    }
    const float* xs = xsum + n * G;
    for (int r = 0; r < kRows; ++r) {
      float bias_term = 0.0f;
      for (int64_t g = 0; g < G; ++g) bias_term += b[r * G + g] * xs[g];
      float dot = 0.0f;
      for (int k = 0; k < kUnitWords; ++k) dot += total[r][k];
      out[n * OC + o0 + r] = dot + bias_term;
    }
  }
}

template <int kBits>
FLOTILLA_KERNEL void fused_rows_bits(float* out, const float* inp, const QuantMatrix& m, int64_t N) {
  const int64_t OC = m.rows, C = m.cols, G = m.groups_per_row();
  std::vector<float> xp(static_cast<size_t>(N * C)), xsum(static_cast<size_t>(N * G));
  make_planar_input<kBits>(inp, N, C, m.format.group_size, xp.data(), xsum.data());
  std::vector<int32_t> word_group(static_cast<size_t>(m.words_per_row()));
  const int64_t words_per_group = m.format.group_size / m.format.per_word();
  for (int64_t wi = 0; wi < m.words_per_row(); ++wi) word_group[static_cast<size_t>(wi)] = static_cast<int32_t>(wi / words_per_group);
  const int64_t blocks = OC / kRowBlock;
#pragma omp parallel
  {
    std::vector<float> s(static_cast<size_t>(kRowBlock * G)), b(s.size());
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk)
      fused_row_block<kBits, kRowBlock>(m, blk * kRowBlock, xp.data(), xsum.data(), word_group.data(), N, out, OC,
                                        s.data(), b.data());
#pragma omp for schedule(static)
    for (int64_t o = blocks * kRowBlock; o < OC; ++o)
      fused_row_block<kBits, 1>(m, o, xp.data(), xsum.data(), word_group.data(), N, out, OC, s.data(), b.data());
  }
}

}  // namespace

bool qmatmul_fused_supported(const QuantMatrix& m) {
  const int64_t words_per_group = m.format.group_size / m.format.per_word();
  return m.cols % (kUnitWords * m.format.per_word()) == 0 &&
         (words_per_group % kUnitWords == 0 || kUnitWords % words_per_group == 0);
}

FLOTILLA_KERNEL void qmatmul_rows_fused(float* out, const float* inp, const QuantMatrix& m, const float* bias,
                                        int64_t N) {
  // out (N, OC), inp (N, C), m (OC, C), bias (OC) or nullptr
  if (N == 0 || m.rows == 0) return;
  if (!qmatmul_fused_supported(m)) throw Error("kernels/quant", "fused product: cols not a multiple of a unit");
  switch (m.format.bits) {
    case 2: fused_rows_bits<2>(out, inp, m, N); break;
    case 4: fused_rows_bits<4>(out, inp, m, N); break;
    default: fused_rows_bits<8>(out, inp, m, N); break;
  }
  if (bias)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < m.rows; ++o) out[n * m.rows + o] += bias[o];
}

FLOTILLA_KERNEL void qmatmul_rows_dequantized(float* out, const float* inp, const QuantMatrix& m, const float* bias,
                                              int64_t N) {
  // out (N, OC), inp (N, C), m (OC, C), bias (OC) or nullptr
  const int64_t OC = m.rows, C = m.cols;
  if (N == 0 || OC == 0) return;
#pragma omp parallel
  {
    RowScratch sc(m);
    std::vector<float> wrow(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t o = 0; o < OC; ++o) {
      dequantize_row(m, o, wrow.data(), sc.s.data(), sc.b.data());
      for (int64_t n = 0; n < N; ++n) {
        const float* x = inp + n * C;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < C; ++c) acc += x[c] * wrow[static_cast<size_t>(c)];
        out[n * OC + o] = acc + (bias ? bias[o] : 0.0f);
      }
    }
  }
}

FLOTILLA_KERNEL void qmatmul_forward(float* out, const float* inp, const QuantMatrix& m, const float* bias, int64_t N,
                                     GemmInput input) {
  // out (N, OC), inp (N, C), m (OC, C), bias (OC) or nullptr
  const int64_t OC = m.rows, C = m.cols;
  if (N == 0 || OC == 0) return;
  if (N > kRowPathMaxRows && input == GemmInput::bf16) {
    std::vector<uint16_t> x(static_cast<size_t>(N * C));
    convert_to_bf16(inp, N * C, x.data());
    for_each_tile<uint16_t>(m, [&](int64_t r0, int64_t nr, const uint16_t* tile) {
      gemm_bf16(Transpose::no, Transpose::yes, N, nr, C, 1.0f, x.data(), C, tile, C, false, out + r0, OC);
    });
  } else if (N <= kRowPathMaxRows) {
    // Decoding and short prompts: bound by reading the packed bytes once, not by arithmetic.
    if (qmatmul_fused_supported(m)) qmatmul_rows_fused(out, inp, m, bias, N);
    else qmatmul_rows_dequantized(out, inp, m, bias, N);
    return;  // the bias is in
  } else {
    // out[:, r0:r0+nr] = inp (N, C) @ tile (nr, C)^T
    for_each_tile<float>(m, [&](int64_t r0, int64_t nr, const float* tile) {
      gemm(Transpose::no, Transpose::yes, N, nr, C, 1.0f, inp, C, tile, C, false, out + r0, OC);
    });
  }
  if (bias) {
#pragma omp parallel for schedule(static) if (N * OC > (1 << 15))
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OC; ++o) out[n * OC + o] += bias[o];
  }
}

FLOTILLA_KERNEL void qmatmul_backward_input(float* dinp, const float* dout, const QuantMatrix& m, int64_t N,
                                            GemmInput input) {
  // dinp (N, C) += dout (N, OC) @ m (OC, C)
  const int64_t OC = m.rows, C = m.cols;
  if (N == 0 || OC == 0 || C == 0 || dinp == nullptr) return;
  // dinp += dout[:, r0:r0+nr] (N, nr) @ tile (nr, C)
  if (input == GemmInput::bf16) {
    std::vector<uint16_t> g(static_cast<size_t>(N * OC));
    convert_to_bf16(dout, N * OC, g.data());
    for_each_tile<uint16_t>(m, [&](int64_t r0, int64_t nr, const uint16_t* tile) {
      gemm_bf16(Transpose::no, Transpose::no, N, C, nr, 1.0f, g.data() + r0, OC, tile, C, true, dinp, C);
    });
    return;
  }
  for_each_tile<float>(m, [&](int64_t r0, int64_t nr, const float* tile) {
    gemm(Transpose::no, Transpose::no, N, C, nr, 1.0f, dout + r0, OC, tile, C, true, dinp, C);
  });
}

void qembedding_forward(float* out, const int32_t* tokens, const QuantMatrix& m, int64_t N) {
  // out (N, C), tokens (N)
#pragma omp parallel if (N * m.cols > (1 << 15))
  {
    RowScratch sc(m);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) dequantize_row(m, tokens[n], out + n * m.cols, sc.s.data(), sc.b.data());
  }
}

void qembedding_forward_rows(float* out, const int32_t* tokens, const QuantMatrix& m, int64_t N, int64_t row_begin,
                             int64_t row_end) {
  // out (N, C), tokens (N), m (row_end - row_begin, C): vocabulary rows [row_begin, row_end)
#pragma omp parallel if (N * m.cols > (1 << 15))
  {
    RowScratch sc(m);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t row = static_cast<int64_t>(tokens[n]);
      float* o = out + n * m.cols;
      if (row < row_begin || row >= row_end)
        std::fill(o, o + m.cols, 0.0f);
      else
        dequantize_row(m, row - row_begin, o, sc.s.data(), sc.b.data());
    }
  }
}

}  // namespace flotilla::kernels
