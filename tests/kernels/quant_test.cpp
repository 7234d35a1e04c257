// Affine group quantization (MLX layout) as a specification: packing is MLX's bit order,
// quantize -> dequantize stays within the bound the format implies, and the products
// computed from packed weights equal float products with the dequantized matrix.
#include "flotilla/kernels/quant.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "flotilla/kernels/kernels.hpp"
#include "../requires_bf16.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::test_seed;
using testing::uniform_vec;

// A quantized matrix with its own storage.
struct OwnedQuant {
  std::vector<uint32_t> packed;
  std::vector<std::byte> scales, biases;
  QuantMatrix m;

  OwnedQuant(const std::vector<float>& w, int64_t rows, int64_t cols, QuantFormat f, DType dt)
      : packed(static_cast<size_t>(rows * cols / f.per_word())),
        scales(static_cast<size_t>(rows * cols / f.group_size) * dtype_size(dt)),
        biases(scales.size()) {
    quantize_rows(w.data(), rows, cols, f, dt, packed.data(), scales.data(), biases.data());
    m = QuantMatrix{rows, cols, f, dt, reinterpret_cast<const std::byte*>(packed.data()), scales.data(), biases.data()};
  }
  std::vector<float> dequantized() const {
    std::vector<float> out(static_cast<size_t>(m.rows * m.cols));
    dequantize_rows(m, 0, m.rows, out.data());
    return out;
  }
  float param(const std::vector<std::byte>& v, int64_t i) const {
    std::vector<float> f(1);
    convert_to_f32(m.scale_dtype, v.data() + i * static_cast<int64_t>(dtype_size(m.scale_dtype)), f);
    return f[0];
  }
};

TEST(Quant, PackUnpackRoundTripInMlxBitOrder) {
  Rng rng(test_seed());
  for (int bits : {2, 4, 8}) {
    const int64_t cols = 96;
    std::vector<uint8_t> q(cols), back(cols);
    for (auto& v : q) v = static_cast<uint8_t>(rng.below(1u << bits));
    std::vector<uint32_t> words(static_cast<size_t>(cols * bits / 32));
    pack_row(q.data(), cols, bits, words.data());
    unpack_row(words.data(), cols, bits, back.data());
    EXPECT_EQ(q, back) << bits << " bits";
    // Element j sits in word j / (32/bits) at bit (j % (32/bits)) * bits: MLX's order.
    const int per_word = 32 / bits;
    for (int64_t j = 0; j < cols; ++j)
      ASSERT_EQ((words[static_cast<size_t>(j / per_word)] >> ((j % per_word) * bits)) & ((1u << bits) - 1u), q[j]);
  }
}

// |w - deq(q(w))| <= scale/2 + |min - bias|: scale/2 is the rounding to the nearest level;
// the bias is the group minimum rounded to the storage dtype, so elements below it clamp to
// level 0 and lose at most that rounding (half an ulp: 2^-11 relative in f16, 2^-8 in bf16).
// A float32 slack of 1e-6 covers the arithmetic of s*q+b itself.
TEST(Quant, QuantizeDequantizeErrorWithinHalfAScale) {
  Rng rng(test_seed());
  for (DType dt : {DType::f16, DType::bf16, DType::f32}) {
    for (int bits : {2, 4, 8}) {
      for (int64_t gs : {32, 64}) {
        const int64_t rows = 7, cols = 192;
        std::vector<float> w = uniform_vec(rng, static_cast<size_t>(rows * cols), -2.0f, 3.0f);
        w[5] = 0.0f;                                     // constant-ish and exact values too
        std::fill(w.begin() + cols, w.begin() + cols + gs, 0.25f);  // a constant group: scale 0
        OwnedQuant q(w, rows, cols, {bits, gs}, dt);
        const std::vector<float> d = q.dequantized();
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < cols; ++j) {
            const int64_t g = r * (cols / gs) + j / gs;
            const float* grp = w.data() + r * cols + (j / gs) * gs;
            const float mn = *std::min_element(grp, grp + gs);
            const float scale = q.param(q.scales, g), bias = q.param(q.biases, g);
            const double bound = scale / 2.0 + std::fabs(mn - bias) + 1e-6;
            const size_t i = static_cast<size_t>(r * cols + j);
            ASSERT_LE(std::fabs(w[i] - d[i]), bound)
                << "bits " << bits << " gs " << gs << " dtype " << dtype_name(dt) << " at " << r << "," << j;
          }
        }
        // The constant group comes back exactly.
        for (int64_t j = 0; j < gs; ++j) EXPECT_EQ(d[static_cast<size_t>(cols + j)], 0.25f);
      }
    }
  }
}

// Reference: the float GEMM with the dequantized matrix. Tiling only changes which SGEMM
// computes which output block, not the sums (each output is one dot product of length C
// in both), so the two agree to float rounding of a length-C sum: 1e-5 relative to the
// sum of |x||w| terms, here ~ C * 1 * 3 -> atol 2e-4.
void expect_close(const std::vector<float>& a, const std::vector<float>& b, double atol, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a[i])) << what << " " << i;
    ASSERT_NEAR(a[i], b[i], atol) << what << " at " << i;
  }
}

TEST(Quant, MatmulAndInputGradientEqualFloatWithDequantizedWeights) {
  Rng rng(test_seed());
  // OC not a multiple of any tile (tiles are kQuantTileFloats / C rows), C = 3 groups +;
  // N = 3 takes the row-at-a-time decoding path, N = 37 the tiled SGEMM path.
  const int64_t C = 320, OC = 3300 + 7;
  for (int bits : {4, 8}) {
    const std::vector<float> w = uniform_vec(rng, static_cast<size_t>(OC * C));
    OwnedQuant q(w, OC, C, {bits, 64}, DType::f16);
    const std::vector<float> wd = q.dequantized();
    const std::vector<float> bias = uniform_vec(rng, static_cast<size_t>(OC));
    for (int64_t N : {1, 3, 37}) {
      const std::vector<float> x = uniform_vec(rng, static_cast<size_t>(N * C));
      // One sentinel float past the end must survive.
      std::vector<float> out(static_cast<size_t>(N * OC + 1), 7.0f), ref(static_cast<size_t>(N * OC));
      qmatmul_forward(out.data(), x.data(), q.m, bias.data(), N);
      matmul_forward(ref.data(), x.data(), wd.data(), bias.data(), N, C, OC);
      EXPECT_EQ(out.back(), 7.0f);
      out.pop_back();
      expect_close(out, ref, 2e-4, "forward");

      const std::vector<float> dout = uniform_vec(rng, static_cast<size_t>(N * OC));
      std::vector<float> dx = uniform_vec(rng, static_cast<size_t>(N * C));  // accumulates onto this
      std::vector<float> dx_ref = dx;
      qmatmul_backward_input(dx.data(), dout.data(), q.m, N);
      matmul_backward(dx_ref.data(), nullptr, nullptr, dout.data(), x.data(), wd.data(), N, C, OC);
      // Length-OC sums: atol scaled accordingly (OC ~ 10 C).
      expect_close(dx, dx_ref, 2e-3, "input gradient");
    }
  }
}

// bf16: the tiles are dequantized into bf16 and the input rounded to bf16, so the product
// equals the float32 product of the rounded dequantized weights and rounded inputs (float32
// rounding apart: the atol above). The few-row path stays float32.
TEST(Quant, Bf16ProductsRoundTheDequantizedTiles) {
  SKIP_WITHOUT_BF16();
  Rng rng(test_seed());
  const int64_t C = 320, OC = 1100 + 7, N = 37;
  auto rounded = [](std::vector<float> v) {
    for (float& x : v) x = bf16_to_f32(f32_to_bf16(x));
    return v;
  };
  const std::vector<float> w = uniform_vec(rng, static_cast<size_t>(OC * C));
  OwnedQuant q(w, OC, C, {4, 64}, DType::bf16);
  const std::vector<float> wr = rounded(q.dequantized());
  const std::vector<float> bias = uniform_vec(rng, static_cast<size_t>(OC));
  const std::vector<float> x = uniform_vec(rng, static_cast<size_t>(N * C));
  std::vector<float> out(static_cast<size_t>(N * OC)), ref(out.size());
  qmatmul_forward(out.data(), x.data(), q.m, bias.data(), N, GemmInput::bf16);
  matmul_forward(ref.data(), rounded(x).data(), wr.data(), bias.data(), N, C, OC);
  expect_close(out, ref, 2e-4, "bf16 forward");

  const std::vector<float> dout = uniform_vec(rng, static_cast<size_t>(N * OC));
  std::vector<float> dx = uniform_vec(rng, static_cast<size_t>(N * C));
  std::vector<float> dx_ref = dx;
  qmatmul_backward_input(dx.data(), dout.data(), q.m, N, GemmInput::bf16);
  matmul_backward(dx_ref.data(), nullptr, nullptr, rounded(dout).data(), x.data(), wr.data(), N, C, OC);
  expect_close(dx, dx_ref, 2e-3, "bf16 input gradient");
}

// The fused few-row product against the exact product of the dequantized weights (double
// sums of the float w = s*q + b that dequantize_rows gives) and against the previous
// dequantize-then-dot path, on fresh random inputs.
//
// Tolerance, per output: both are float computations of sum_j (s q_j + b) x_j. The fused
// one forms s * sum q x + b * sum x from sums of depth at most d = per_word (a lane's
// planes) + C / (8 per_word) (units) + 8 (lanes) + G (bias terms) + 3, each term carrying at
// most d roundings: |error| <= d u sum_j (|s q_j| + |b|) |x_j| with u = 2^-24 (first order).
// The reference rounds each w once (u |w_j x_j|) and the previous path sums C products in
// SIMD lanes (depth <= C). So atol = (d + C + 2) u sum_j (|s q_j| + |b|) |x_j| covers
// either against the reference; a wrong scale, bias, bit position or group is O(|w x|).
double fused_tolerance(const QuantMatrix& m, const std::vector<float>& s, const std::vector<float>& b,
                       const std::vector<uint8_t>& q_row, const float* x, int64_t o) {
  const int64_t C = m.cols, G = m.groups_per_row(), per_word = m.format.per_word();
  double l1 = 0.0;
  for (int64_t j = 0; j < C; ++j) {
    const int64_t g = o * G + j / m.format.group_size;
    l1 += (std::fabs(static_cast<double>(s[static_cast<size_t>(g)]) * q_row[static_cast<size_t>(j)]) +
           std::fabs(static_cast<double>(b[static_cast<size_t>(g)]))) *
          std::fabs(static_cast<double>(x[j]));
  }
  const double d = static_cast<double>(per_word + C / (8 * per_word) + 8 + G + 3);
  return (d + static_cast<double>(C) + 2.0) * std::ldexp(1.0, -24) * l1;
}

TEST(Quant, FusedFewRowProductEqualsDequantizeThenDot) {
  Rng rng(test_seed());
  const DType scale_dtypes[] = {DType::f16, DType::bf16, DType::f32};
  int case_index = 0;
  for (int bits : {2, 4, 8}) {
    for (int64_t group_size : {32, 64, 128}) {
      // C: three 128-weight blocks (a multiple of every unit: 8 words = 128, 64, 32 weights);
      // OC odd, so the last rows fall outside the 4-row blocks.
      const int64_t C = 384, OC = 4 * 13 + 3;
      const DType dt = scale_dtypes[case_index++ % 3];
      const std::vector<float> w = uniform_vec(rng, static_cast<size_t>(OC * C));
      OwnedQuant q(w, OC, C, {bits, group_size}, dt);
      ASSERT_TRUE(qmatmul_fused_supported(q.m)) << bits << " bits, group " << group_size;
      const std::vector<float> wd = q.dequantized();
      const int64_t G = q.m.groups_per_row();
      std::vector<float> s(static_cast<size_t>(OC * G)), b(s.size());
      for (int64_t i = 0; i < OC * G; ++i) {
        s[static_cast<size_t>(i)] = q.param(q.scales, i);
        b[static_cast<size_t>(i)] = q.param(q.biases, i);
      }
      const std::vector<float> bias = uniform_vec(rng, static_cast<size_t>(OC));
      for (int64_t N = 1; N <= 8; ++N) {
        const std::vector<float> x = uniform_vec(rng, static_cast<size_t>(N * C));
        // Sentinels past the end must survive.
        std::vector<float> fused(static_cast<size_t>(N * OC + 1), 7.0f), previous(fused);
        qmatmul_rows_fused(fused.data(), x.data(), q.m, bias.data(), N);
        qmatmul_rows_dequantized(previous.data(), x.data(), q.m, bias.data(), N);
        ASSERT_EQ(fused.back(), 7.0f);
        ASSERT_EQ(previous.back(), 7.0f);
        std::vector<uint8_t> q_row(static_cast<size_t>(C));
        for (int64_t o = 0; o < OC; ++o) {
          unpack_row(q.packed.data() + o * C / q.m.format.per_word(), C, bits, q_row.data());
          for (int64_t n = 0; n < N; ++n) {
            double ref = bias[static_cast<size_t>(o)];
            for (int64_t j = 0; j < C; ++j)
              ref += static_cast<double>(wd[static_cast<size_t>(o * C + j)]) * x[static_cast<size_t>(n * C + j)];
            const double atol = fused_tolerance(q.m, s, b, q_row, x.data() + n * C, o) + 1e-7;
            const float f = fused[static_cast<size_t>(n * OC + o)], p = previous[static_cast<size_t>(n * OC + o)];
            ASSERT_TRUE(std::isfinite(f));
            ASSERT_NEAR(f, ref, atol) << bits << " bits, group " << group_size << ", N " << N << ", row " << o;
            ASSERT_NEAR(p, ref, atol) << "previous path: " << bits << " bits, group " << group_size;
          }
        }
      }
    }
  }
}

// Each output is one thread's, in a fixed order: the same bits on any thread count.
TEST(Quant, FusedFewRowProductIsTheSameOnOneAndTwoThreads) {
  Rng rng(test_seed());
  const int64_t C = 512, OC = 257, N = 3;
  const std::vector<float> w = uniform_vec(rng, static_cast<size_t>(OC * C));
  OwnedQuant q(w, OC, C, {4, 64}, DType::f16);
  const std::vector<float> x = uniform_vec(rng, static_cast<size_t>(N * C));
  std::vector<float> one(static_cast<size_t>(N * OC)), two(one.size());
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  qmatmul_rows_fused(one.data(), x.data(), q.m, nullptr, N);
  omp_set_num_threads(2);
  qmatmul_rows_fused(two.data(), x.data(), q.m, nullptr, N);
  omp_set_num_threads(saved);
  EXPECT_EQ(one, two);
}

// A row length that is not a whole number of 8-word units takes the dequantize-then-dot path.
TEST(Quant, FewRowProductOfAnUnfusableShapeFallsBack) {
  Rng rng(test_seed());
  const int64_t C = 96, OC = 9, N = 2;  // 4 bits: 96 is not a multiple of 64
  const std::vector<float> w = uniform_vec(rng, static_cast<size_t>(OC * C));
  OwnedQuant q(w, OC, C, {4, 32}, DType::f16);
  ASSERT_FALSE(qmatmul_fused_supported(q.m));
  const std::vector<float> x = uniform_vec(rng, static_cast<size_t>(N * C));
  std::vector<float> out(static_cast<size_t>(N * OC)), ref(out.size());
  qmatmul_forward(out.data(), x.data(), q.m, nullptr, N);
  qmatmul_rows_dequantized(ref.data(), x.data(), q.m, nullptr, N);
  EXPECT_EQ(out, ref);
}

TEST(Quant, EmbeddingDequantizesTheLookedUpRows) {
  Rng rng(test_seed());
  const int64_t V = 50, C = 128;
  const std::vector<float> w = uniform_vec(rng, static_cast<size_t>(V * C));
  OwnedQuant q(w, V, C, {4, 32}, DType::bf16);
  const std::vector<float> wd = q.dequantized();
  const std::vector<int32_t> tokens = {3, 49, 0, 3, 17};
  std::vector<float> out(tokens.size() * C), ref(tokens.size() * C);
  qembedding_forward(out.data(), tokens.data(), q.m, static_cast<int64_t>(tokens.size()));
  embedding_forward(ref.data(), tokens.data(), wd.data(), static_cast<int64_t>(tokens.size()), C);
  EXPECT_EQ(out, ref);
}

}  // namespace
}  // namespace flotilla::kernels
