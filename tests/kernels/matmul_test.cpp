// matmul: forward against a triple loop in double, backward against finite differences and
// against the closed-form products, with the += semantics and the nullptr (frozen) cases.
#include <gtest/gtest.h>

#include <vector>

#include "flotilla/kernels/kernels.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::expect_all_close;
using testing::expect_gradient_matches;
using testing::test_seed;
using testing::uniform_vec;

// out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC), in double.
std::vector<double> naive_linear(const std::vector<float>& inp, const std::vector<float>& weight,
                                 const float* bias, int64_t N, int64_t C, int64_t OC) {
  std::vector<double> out(N * OC);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      double s = bias ? bias[o] : 0.0;
      for (int64_t c = 0; c < C; ++c) s += static_cast<double>(inp[n * C + c]) * weight[o * C + c];
      out[n * OC + o] = s;
    }
  return out;
}

// Float32 GEMM error grows like sqrt(C) * 6e-8 * |terms| for inputs in [-1, 1]: 1e-5 absolute
// covers C up to a few hundred with margin.
constexpr double kGemmAtol = 1e-5;

TEST(Matmul, ForwardMatchesTripleLoop) {
  Rng rng(test_seed());
  struct Shape { int64_t N, C, OC; bool bias; };
  for (const Shape s : {Shape{7, 13, 5, true}, Shape{1, 1, 1, true}, Shape{67, 130, 33, false},
                        Shape{33, 70, 129, true}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << s.N << " C=" << s.C << " OC=" << s.OC);
    auto inp = uniform_vec(rng, s.N * s.C), weight = uniform_vec(rng, s.OC * s.C);
    auto bias = uniform_vec(rng, s.OC);
    std::vector<float> out(s.N * s.OC, std::nanf(""));
    matmul_forward(out.data(), inp.data(), weight.data(), s.bias ? bias.data() : nullptr, s.N, s.C,
                   s.OC);
    expect_all_close("out", out, naive_linear(inp, weight, s.bias ? bias.data() : nullptr, s.N,
                                              s.C, s.OC),
                     kGemmAtol, 1e-5);
  }
}

TEST(Matmul, BackwardMatchesFiniteDifferencesAndAddsIntoGradients) {
  Rng rng(test_seed());
  const int64_t N = 6, C = 7, OC = 5;
  auto inp = uniform_vec(rng, N * C), weight = uniform_vec(rng, OC * C);
  auto bias = uniform_vec(rng, OC);
  const auto R = uniform_vec(rng, N * OC);  // dout, and the functional loss = sum(out * R)
  // Gradient buffers start nonzero: backward must add, not overwrite.
  const auto dinp0 = uniform_vec(rng, N * C), dweight0 = uniform_vec(rng, OC * C);
  const auto dbias0 = uniform_vec(rng, OC);
  auto dinp = dinp0, dweight = dweight0, dbias = dbias0;
  matmul_backward(dinp.data(), dweight.data(), dbias.data(), R.data(), inp.data(), weight.data(),
                  N, C, OC);
  for (size_t i = 0; i < dinp.size(); ++i) dinp[i] -= dinp0[i];
  for (size_t i = 0; i < dweight.size(); ++i) dweight[i] -= dweight0[i];
  for (size_t i = 0; i < dbias.size(); ++i) dbias[i] -= dbias0[i];

  std::vector<float> out(N * OC);
  auto loss = [&] {
    matmul_forward(out.data(), inp.data(), weight.data(), bias.data(), N, C, OC);
    return testing::dot(out, R);
  };
  expect_gradient_matches("dinp", inp, dinp, loss);
  expect_gradient_matches("dweight", weight, dweight, loss);
  expect_gradient_matches("dbias", bias, dbias, loss);
}

TEST(Matmul, BackwardMatchesClosedFormOnLargerShapes) {
  // Shapes past gemm()'s few-row path (oneDNN primitives) and the dbias column blocks (OC > 256).
  Rng rng(test_seed());
  const int64_t N = 45, C = 67, OC = 300;
  auto inp = uniform_vec(rng, N * C), weight = uniform_vec(rng, OC * C);
  const auto dout = uniform_vec(rng, N * OC);
  std::vector<float> dinp(N * C, 0.5f), dweight(OC * C, -0.25f), dbias(OC, 2.0f);
  matmul_backward(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(),
                  weight.data(), N, C, OC);
  std::vector<double> want_dinp(N * C, 0.5), want_dweight(OC * C, -0.25), want_dbias(OC, 2.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      const double g = dout[n * OC + o];
      want_dbias[o] += g;
      for (int64_t c = 0; c < C; ++c) {
        want_dinp[n * C + c] += g * weight[o * C + c];
        want_dweight[o * C + c] += g * inp[n * C + c];
      }
    }
  expect_all_close("dinp", dinp, want_dinp, 1e-4, 1e-5);
  expect_all_close("dweight", dweight, want_dweight, 1e-4, 1e-5);
  expect_all_close("dbias", dbias, want_dbias, 1e-4, 1e-5);
}

TEST(Matmul, BackwardSkipsNullGradients) {
  // Frozen weight (LoRA base) and first-layer input: nullptr gradients are not touched and
  // the others are still right.
  Rng rng(test_seed());
  const int64_t N = 4, C = 3, OC = 2;
  auto inp = uniform_vec(rng, N * C), weight = uniform_vec(rng, OC * C);
  const auto dout = uniform_vec(rng, N * OC);
  std::vector<float> dinp_all(N * C, 0.0f), dweight_all(OC * C, 0.0f), dbias_all(OC, 0.0f);
  matmul_backward(dinp_all.data(), dweight_all.data(), dbias_all.data(), dout.data(), inp.data(),
                  weight.data(), N, C, OC);

  std::vector<float> dinp(N * C, 0.0f);
  matmul_backward(dinp.data(), nullptr, nullptr, dout.data(), inp.data(), weight.data(), N, C, OC);
  EXPECT_EQ(dinp, dinp_all);
  std::vector<float> dweight(OC * C, 0.0f);
  matmul_backward(nullptr, dweight.data(), nullptr, dout.data(), inp.data(), weight.data(), N, C,
                  OC);
  EXPECT_EQ(dweight, dweight_all);
  std::vector<float> dbias(OC, 0.0f);
  matmul_backward(nullptr, nullptr, dbias.data(), dout.data(), inp.data(), weight.data(), N, C, OC);
  EXPECT_EQ(dbias, dbias_all);
}

}  // namespace
}  // namespace flotilla::kernels
