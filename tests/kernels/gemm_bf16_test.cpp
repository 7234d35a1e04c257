// gemm_bf16() and the bf16 linear-layer products as a specification: the result is the
// float32 product of the bf16-rounded inputs, for every transpose, alpha, accumulate,
// stride and row count (few rows included: bf16 has no sgemm path).
//
// Tolerance. Against the exact (double) product of the *rounded* inputs a'_ik, b'_kj,
// only float32 accumulation error remains: gamma_K * sum_k |a'b'| plus one rounding each
// for alpha and the sum with C (gemm_test.cpp), so
//   |got - exact(a', b')| <= (K + 2) * 2^-24 * (|alpha| sum_k |a'_ik b'_kj| + |C0_ij|) * 1.01.
// Rounding to bf16 changes each input by a relative 2^-9 at most, each term by
// ~2^-8, which for these random sums is ~100x the bound: a product of the unrounded
// inputs (a float32 product under a bf16 name) fails this test, and so does any product
// that rounds something other than the inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/tensor/dtype.hpp"
#include "../requires_bf16.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::test_seed;
using testing::uniform_vec;

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  convert_to_bf16(x.data(), static_cast<int64_t>(x.size()), out.data());
  return out;
}

std::vector<float> rounded(const std::vector<float>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return out;
}

TEST(GemmBf16, ConvertRoundsToNearestEven) {
  const std::vector<float> x = {1.0f, 1.00390625f /* 1 + 2^-8: a tie, stays 1 */,
                                1.01171875f /* 1 + 3 * 2^-8: a tie, goes up to 1 + 2^-6 */, -2.5f};
  const std::vector<uint16_t> b = to_bf16(x);
  EXPECT_EQ(bf16_to_f32(b[0]), 1.0f);
  EXPECT_EQ(bf16_to_f32(b[1]), 1.0f);
  EXPECT_EQ(bf16_to_f32(b[2]), 1.015625f);
  EXPECT_EQ(bf16_to_f32(b[3]), -2.5f);
  // A long vector goes through the threaded loop: the same answer element by element.
  Rng rng(test_seed());
  const std::vector<float> big = uniform_vec(rng, 200000);
  const std::vector<uint16_t> bb = to_bf16(big);
  for (size_t i = 0; i < big.size(); ++i) ASSERT_EQ(bb[i], f32_to_bf16(big[i])) << i;
}

TEST(GemmBf16, EqualsFloatProductOfRoundedInputs) {
  SKIP_WITHOUT_BF16();
  Rng rng(test_seed());
  struct Case {
    Transpose ta, tb;
    int64_t M, N, K, pad;
    float alpha;
    bool accumulate;
  };
  const std::vector<Case> cases = {
      {Transpose::no, Transpose::no, 37, 29, 53, 0, 1.0f, false},
      {Transpose::no, Transpose::yes, 64, 48, 96, 3, 1.0f, true},
      {Transpose::yes, Transpose::no, 40, 33, 70, 1, 0.5f, true},
      {Transpose::yes, Transpose::yes, 17, 20, 31, 2, -2.0f, false},
      {Transpose::no, Transpose::yes, 1, 300, 128, 0, 1.0f, false},  // a decoding step
      {Transpose::no, Transpose::no, 3, 50, 64, 5, 1.0f, true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "ta=" << (c.ta == Transpose::yes) << " tb=" << (c.tb == Transpose::yes)
                                      << " M=" << c.M << " N=" << c.N << " K=" << c.K);
    const int64_t a_rows = c.ta == Transpose::no ? c.M : c.K, a_cols = c.ta == Transpose::no ? c.K : c.M;
    const int64_t b_rows = c.tb == Transpose::no ? c.K : c.N, b_cols = c.tb == Transpose::no ? c.N : c.K;
    const int64_t lda = a_cols + c.pad, ldb = b_cols + c.pad, ldc = c.N + c.pad;
    const std::vector<float> A = uniform_vec(rng, static_cast<size_t>(a_rows * lda));
    const std::vector<float> B = uniform_vec(rng, static_cast<size_t>(b_rows * ldb));
    const std::vector<float> C0 = uniform_vec(rng, static_cast<size_t>(c.M * ldc));
    const std::vector<float> Ar = rounded(A), Br = rounded(B);
    std::vector<float> C = C0;
    gemm_bf16(c.ta, c.tb, c.M, c.N, c.K, c.alpha, to_bf16(A).data(), lda, to_bf16(B).data(), ldb, c.accumulate,
              C.data(), ldc);
    int failures = 0;
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t n = 0; n < ldc; ++n) {
        const size_t at = static_cast<size_t>(m * ldc + n);
        if (n >= c.N) {  // padding columns untouched
          ASSERT_EQ(C[at], C0[at]);
          continue;
        }
        double exact = 0.0, magnitude = 0.0;
        for (int64_t k = 0; k < c.K; ++k) {
          const double a = c.ta == Transpose::no ? Ar[m * lda + k] : Ar[k * lda + m];
          const double b = c.tb == Transpose::no ? Br[k * ldb + n] : Br[n * ldb + k];
          exact += a * b;
          magnitude += std::fabs(a * b);
        }
        exact *= c.alpha;
        magnitude *= std::fabs(c.alpha);
        if (c.accumulate) {
          exact += C0[at];
          magnitude += std::fabs(C0[at]);
        }
        const double bound = (c.K + 2) * std::ldexp(1.0, -24) * magnitude * 1.01;
        if (std::fabs(C[at] - exact) > bound && ++failures <= 5)
          ADD_FAILURE() << "C[" << m << "," << n << "] = " << C[at] << ", exact " << exact << ", bound " << bound;
      }
    }
    EXPECT_EQ(failures, 0);
  }
}

// Linear layer products in bf16 = the float32 products of the rounded operands (float32
// rounding apart: the float32 gemm's own bound, a few 1e-6 here).
TEST(GemmBf16, LinearForwardAndBackwardRoundTheirInputs) {
  SKIP_WITHOUT_BF16();
  Rng rng(test_seed());
  const int64_t N = 45, C = 96, OC = 70;
  const std::vector<float> x = uniform_vec(rng, N * C), w = uniform_vec(rng, OC * C), bias = uniform_vec(rng, OC);
  const std::vector<float> dout = uniform_vec(rng, N * OC);
  const std::vector<uint16_t> wb = to_bf16(w);
  const auto expect_near = [](const std::vector<float>& got, const std::vector<float>& want, const char* what) {
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-5) << what << " at " << i;
  };

  std::vector<float> out(N * OC), ref(N * OC);
  matmul_forward_bf16(out.data(), x.data(), wb.data(), bias.data(), N, C, OC);
  matmul_forward(ref.data(), rounded(x).data(), rounded(w).data(), bias.data(), N, C, OC);
  expect_near(out, ref, "forward");
  // The float-weight overload (LoRA's adapters) rounds the weight itself.
  matmul_forward(out.data(), x.data(), w.data(), bias.data(), N, C, OC, GemmInput::bf16);
  expect_near(out, ref, "forward, float weight");

  // Gradients accumulate onto what is there.
  const std::vector<float> dx0 = uniform_vec(rng, N * C), dw0 = uniform_vec(rng, OC * C), db0 = uniform_vec(rng, OC);
  std::vector<float> dx = dx0, dw = dw0, db = db0, dx_ref = dx0, dw_ref = dw0, db_ref = db0;
  matmul_backward_bf16(dx.data(), dw.data(), db.data(), dout.data(), x.data(), wb.data(), N, C, OC);
  const std::vector<float> dout_r = rounded(dout);
  matmul_backward(dx_ref.data(), dw_ref.data(), nullptr, dout_r.data(), rounded(x).data(), rounded(w).data(), N, C,
                  OC);
  // The bias gradient sums the float32 dout, unrounded.
  matmul_backward(nullptr, nullptr, db_ref.data(), dout.data(), x.data(), w.data(), N, C, OC);
  expect_near(dx, dx_ref, "input gradient");
  expect_near(dw, dw_ref, "weight gradient");
  for (int64_t o = 0; o < OC; ++o) ASSERT_EQ(db[o], db_ref[o]) << o;

  std::vector<float> acc = dx0, acc_ref = dx0;
  matmul_accumulate(acc.data(), dout.data(), w.data(), N, OC, C, 0.5f, GemmInput::bf16);
  // out (N, C) += 0.5 * dout (N, OC) @ w^T where w is read as (C, OC)
  matmul_accumulate(acc_ref.data(), dout_r.data(), rounded(w).data(), N, OC, C, 0.5f);
  expect_near(acc, acc_ref, "accumulate");
}

TEST(GemmBf16, UnsupportedCpuIsAnErrorNotACrash) {
  if (gemm_bf16_supported()) GTEST_SKIP() << "this CPU has a bf16 matmul (the qemu CLI test covers the other case)";
  std::vector<uint16_t> a(16 * 16, 0x3f80);
  std::vector<float> c(16 * 16);
  EXPECT_THROW(gemm_bf16(Transpose::no, Transpose::no, 16, 16, 16, 1.0f, a.data(), 16, a.data(), 16, false, c.data(), 16),
               Error);
}

}  // namespace
}  // namespace flotilla::kernels
