// gemm() (oneDNN) as a specification: every transpose and accumulate combination, alpha,
// strided operands and both of its paths (few rows: dnnl_sgemm; otherwise a cached matmul
// primitive) against a triple loop in double; sentinels around C; one primitive per
// signature; the same bits run to run; calls from many threads and from inside an OpenMP
// parallel region.
//
// Tolerance: any float32 summation order of K products (FMA or not) is within
// gamma_K * sum_k |a_ik b_kj| of the exact sum, gamma_K = K u / (1 - K u), u = 2^-24
// (Higham, Accuracy and Stability, 3.1); the output scale alpha and the sum with the old C
// add one rounding each. So per element
//   |got - exact| <= (K + 2) * 2^-24 * (|alpha| * sum_k |a_ik b_kj| + |C0_ij|) * 1.01,
// a bound no correct implementation can exceed, whatever its blocking, and ~1e-4 of the
// O(1) error a wrong transpose, stride, alpha or a lost accumulation makes.
#include "flotilla/kernels/gemm.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::test_seed;
using testing::uniform_vec;

constexpr float kSentinel = 12345.0f;

struct Case {
  Transpose ta, tb;
  int64_t M, N, K;
  int64_t pad_a, pad_b, pad_c;  // leading dimension minus the minimal one
  float alpha;
  bool accumulate;
};

std::string describe(const Case& c) {
  return (::testing::Message() << "ta=" << (c.ta == Transpose::yes) << " tb=" << (c.tb == Transpose::yes)
                              << " M=" << c.M << " N=" << c.N << " K=" << c.K << " pads=" << c.pad_a
                              << "," << c.pad_b << "," << c.pad_c << " alpha=" << c.alpha
                              << " accumulate=" << c.accumulate)
      .GetString();
}

// Operands laid out as gemm() reads them, C with sentinels in its padding columns.
struct Operands {
  int64_t lda, ldb, ldc;
  std::vector<float> A, B, C0;
};

Operands make_operands(Rng& rng, const Case& c) {
  Operands o;
  const int64_t a_rows = c.ta == Transpose::no ? c.M : c.K, a_cols = c.ta == Transpose::no ? c.K : c.M;
  const int64_t b_rows = c.tb == Transpose::no ? c.K : c.N, b_cols = c.tb == Transpose::no ? c.N : c.K;
  o.lda = a_cols + c.pad_a;
  o.ldb = b_cols + c.pad_b;
  o.ldc = c.N + c.pad_c;
  o.A = uniform_vec(rng, static_cast<size_t>(a_rows * o.lda));
  o.B = uniform_vec(rng, static_cast<size_t>(b_rows * o.ldb));
  o.C0 = uniform_vec(rng, static_cast<size_t>(c.M * o.ldc));
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = c.N; n < o.ldc; ++n) o.C0[m * o.ldc + n] = kSentinel;
  return o;
}

void run(const Case& c, const Operands& o, std::vector<float>& C) {
  gemm(c.ta, c.tb, c.M, c.N, c.K, c.alpha, o.A.data(), o.lda, o.B.data(), o.ldb, c.accumulate, C.data(), o.ldc);
}

// Checks C against the triple loop in double with the bound above; padding untouched.
void expect_matches_triple_loop(const Case& c, const Operands& o, const std::vector<float>& C) {
  int failures = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < c.N; ++n) {
      double exact = 0.0, magnitude = 0.0;
      for (int64_t k = 0; k < c.K; ++k) {
        const double a = c.ta == Transpose::no ? o.A[m * o.lda + k] : o.A[k * o.lda + m];
        const double b = c.tb == Transpose::no ? o.B[k * o.ldb + n] : o.B[n * o.ldb + k];
        exact += a * b;
        magnitude += std::fabs(a * b);
      }
      exact *= c.alpha;
      magnitude *= std::fabs(c.alpha);
      const double c0 = o.C0[m * o.ldc + n];
      if (c.accumulate) {
        exact += c0;
        magnitude += std::fabs(c0);
      }
      const double tol = static_cast<double>(c.K + 2) * std::ldexp(1.0, -24) * magnitude * 1.01;
      const double got = C[m * o.ldc + n];
      if (!(std::fabs(got - exact) <= tol) && ++failures <= 5)
        ADD_FAILURE() << "C[" << m << "," << n << "] = " << got << ", want " << exact << " +- " << tol;
    }
    for (int64_t n = c.N; n < o.ldc; ++n)
      if (C[m * o.ldc + n] != kSentinel && ++failures <= 5)
        ADD_FAILURE() << "padding C[" << m << "," << n << "] overwritten: " << C[m * o.ldc + n];
  }
  EXPECT_EQ(failures, 0);
}

// Fresh random shapes (logged through the seed): odd sizes, both sides of the few-row
// threshold, every transpose and accumulate combination, alpha 1 and not, strided or not.
TEST(Gemm, EveryTransposeAndAccumulateMatchesTripleLoop) {
  Rng rng(test_seed());
  auto dim = [&rng](int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo + 1))); };
  for (int round = 0; round < 3; ++round) {
    for (Transpose ta : {Transpose::no, Transpose::yes})
      for (Transpose tb : {Transpose::no, Transpose::yes})
        for (bool accumulate : {false, true}) {
          Case c{ta, tb, 0, 0, 0, 0, 0, 0, 1.0f, accumulate};
          // Round 0: fewer rows than the primitive threshold; then primitives, odd sizes.
          c.M = round == 0 ? dim(1, kGemmPrimitiveMinRows - 1) : dim(kGemmPrimitiveMinRows, 97);
          c.N = dim(1, 83);
          c.K = dim(1, 131);
          if (rng.below(2)) c.pad_a = dim(1, 9);
          if (rng.below(2)) c.pad_b = dim(1, 9);
          if (rng.below(2)) c.pad_c = dim(1, 9);
          if (rng.below(2)) c.alpha = 0.125f + static_cast<float>(rng.below(1000)) / 997.0f;
          SCOPED_TRACE(describe(c));
          const Operands o = make_operands(rng, c);
          std::vector<float> C = o.C0;
          if (!accumulate)  // beta = 0 must not read C: NaN there must not leak through
            for (int64_t m = 0; m < c.M; ++m)
              for (int64_t n = 0; n < c.N; ++n) C[m * o.ldc + n] = std::nanf("");
          run(c, o, C);
          expect_matches_triple_loop(c, o, C);
        }
  }
}

// A product longer than a piece along K, M or N (the lm_head's vocabulary) runs as several
// primitive calls (gemm_onednn.cpp's in_pieces); the pieces must tile C and the K pieces
// must accumulate, with the caller's alpha and accumulate, transposed or not.
TEST(Gemm, ProductsSplitIntoPiecesAlongKMOrNMatchTripleLoop) {
  Rng rng(test_seed());
  const Case cases[] = {
      {Transpose::no, Transpose::no, 17, 5, 9001, 0, 3, 1, 0.5f, false},   // K: 3 pieces
      {Transpose::yes, Transpose::yes, 16, 3, 8999, 2, 0, 0, 1.0f, true},  // K, both transposed
      {Transpose::yes, Transpose::no, 8200, 3, 4, 1, 0, 2, 0.75f, true},   // M, A transposed
      {Transpose::no, Transpose::yes, 8193, 2, 3, 0, 1, 0, 1.0f, false},   // M
      {Transpose::no, Transpose::yes, 16, 8300, 3, 0, 0, 5, 1.0f, true},   // N, B transposed
      {Transpose::yes, Transpose::no, 19, 9000, 2, 0, 4, 0, 2.0f, false},  // N
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c));
    const Operands o = make_operands(rng, c);
    std::vector<float> C = o.C0;
    run(c, o, C);
    expect_matches_triple_loop(c, o, C);
  }
}

TEST(Gemm, EmptyInnerDimensionZeroesOrKeepsC) {
  const float A[1] = {1.0f}, B[1] = {1.0f};
  std::vector<float> C(6, 3.0f);
  gemm(Transpose::no, Transpose::no, 2, 3, 0, 1.0f, A, 1, B, 3, true, C.data(), 3);
  EXPECT_EQ(C, std::vector<float>(6, 3.0f));
  gemm(Transpose::no, Transpose::no, 2, 3, 0, 1.0f, A, 1, B, 3, false, C.data(), 3);
  EXPECT_EQ(C, std::vector<float>(6, 0.0f));
}

TEST(Gemm, OnePrimitivePerSignatureReusedAfterwards) {
  gemm_clear_cache();
  Rng rng(test_seed());
  const Case c{Transpose::no, Transpose::yes, 40, 24, 32, 0, 0, 0, 1.0f, true};
  const Operands o = make_operands(rng, c);
  std::vector<float> C = o.C0;
  run(c, o, C);
  EXPECT_EQ(gemm_engine_info().cached_primitives, 1u);
  run(c, o, C);
  run(c, o, C);
  EXPECT_EQ(gemm_engine_info().cached_primitives, 1u) << "the same signature created again";
  Case other = c;
  other.accumulate = false;  // a different post-op is a different primitive
  run(other, o, C);
  EXPECT_EQ(gemm_engine_info().cached_primitives, 2u);
  Case few = c;
  few.M = kGemmPrimitiveMinRows - 1;  // the few-row path creates none
  run(few, o, C);
  EXPECT_EQ(gemm_engine_info().cached_primitives, 2u);
  // oneDNN splits the work when it creates a primitive: a new thread count, a new one.
  const int saved = omp_get_max_threads();
  omp_set_num_threads(saved + 1);
  run(c, o, C);
  omp_set_num_threads(saved);
  EXPECT_EQ(gemm_engine_info().cached_primitives, 3u);
}

TEST(Gemm, SameInputsGiveTheSameBitsRunToRun) {
  // Big enough that oneDNN splits the work over the threads (ctest runs with 2).
  Rng rng(test_seed());
  for (bool accumulate : {false, true}) {
    const Case c{Transpose::yes, Transpose::no, 96, 160, 1031, 0, 0, 0, 1.0f, accumulate};
    const Operands o = make_operands(rng, c);
    std::vector<float> first = o.C0, second = o.C0;
    run(c, o, first);
    gemm_clear_cache();  // a freshly created primitive too
    run(c, o, second);
    EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)), 0)
        << "accumulate=" << accumulate;
  }
}

TEST(Gemm, OneSignatureOnNewBuffersEachCallReadsAndWritesThoseBuffers) {
  // Each thread keeps the memory objects of a signature and points them at every call's
  // buffers: a call must read its own A and B and write its own C, never a previous call's
  // (nor one bound before gemm_clear_cache).
  Rng rng(test_seed());
  const Case c{Transpose::no, Transpose::yes, 40, 24, 32, 0, 0, 0, 1.0f, true};
  for (int round = 0; round < 2; ++round) {
    std::vector<Operands> operands;
    std::vector<std::vector<float>> results;
    for (int i = 0; i < 3; ++i) {
      operands.push_back(make_operands(rng, c));
      results.push_back(operands.back().C0);
    }
    for (int i = 0; i < 3; ++i) run(c, operands[static_cast<size_t>(i)], results[static_cast<size_t>(i)]);
    for (int i = 0; i < 3; ++i)
      expect_matches_triple_loop(c, operands[static_cast<size_t>(i)], results[static_cast<size_t>(i)]);
    gemm_clear_cache();
  }
}

TEST(Gemm, CallsFromManyThreadsAndFromInsideParallelRegionsAreCorrect) {
  gemm_clear_cache();
  Rng rng(test_seed());
  // One new signature for all callers at once: they race to create and then share it.
  const Case c{Transpose::no, Transpose::no, 33, 47, 65, 3, 0, 1, 0.5f, true};
  const Operands o = make_operands(rng, c);
  constexpr int kThreads = 4;
  std::vector<std::vector<float>> results(kThreads, o.C0);
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t) pool.emplace_back([&, t] { run(c, o, results[static_cast<size_t>(t)]); });
  for (auto& th : pool) th.join();
  for (const auto& r : results) expect_matches_triple_loop(c, o, r);

  // Inside an OpenMP region each thread's product runs on that thread alone, whatever the
  // team size: all of C must be written (a plan made for the whole team would leave parts).
  std::vector<std::vector<float>> in_region(8, o.C0);
  const int saved = omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(2)
  for (int i = 0; i < 8; ++i) run(c, o, in_region[static_cast<size_t>(i)]);
  EXPECT_EQ(omp_get_max_threads(), saved) << "thread count not restored after the region";
  for (const auto& r : in_region) expect_matches_triple_loop(c, o, r);
}

TEST(Gemm, EngineIsOneDnnOnTheOpenMpRuntime) {
  const GemmEngineInfo info = gemm_engine_info();
  EXPECT_NE(info.library.find("oneDNN"), std::string::npos) << info.library;
  EXPECT_NE(info.library.find("CPU runtime: OpenMP"), std::string::npos) << info.library;
  EXPECT_FALSE(info.isa.empty());
  EXPECT_NE(info.isa.rfind("cpu_isa_", 0), 0u) << "the library's prefix is dropped: " << info.isa;
}

}  // namespace
}  // namespace flotilla::kernels
