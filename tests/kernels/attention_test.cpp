// attention: causal GQA attention against a naive double-precision reference (forward and
// backward), finite differences on small shapes, the KV-cache offset (Tq < Tk), GQA
// against MHA with repeated kv heads, and the bf16 products (--dtype bf16). Shapes include several 64-row blocks with ragged ends
// so the blocked causal GEMMs are exercised.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/tensor/dtype.hpp"
#include "../requires_bf16.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::expect_all_close;
using testing::test_seed;
using testing::uniform_vec;

struct Shape {
  int64_t B, Tq, Tk, NH, NKV, hd;
  size_t q_size() const { return B * Tq * NH * hd; }
  size_t kv_size() const { return B * Tk * NKV * hd; }
  size_t probs_size() const { return B * NH * Tq * Tk; }
};

std::ostream& operator<<(std::ostream& os, const Shape& s) {
  return os << "B=" << s.B << " Tq=" << s.Tq << " Tk=" << s.Tk << " NH=" << s.NH
            << " NKV=" << s.NKV << " hd=" << s.hd;
}

struct Reference {
  std::vector<double> out, probs, dq, dk, dv;
};

// The textbook formulas, one (b, h) at a time, in double. dout may be empty (forward only).
Reference naive_attention(const Shape& s, const std::vector<float>& q, const std::vector<float>& k,
                          const std::vector<float>& v, const std::vector<float>& dout) {
  Reference r;
  r.out.assign(s.q_size(), 0.0);
  r.probs.assign(s.probs_size(), 0.0);
  r.dq.assign(s.q_size(), 0.0);
  r.dk.assign(s.kv_size(), 0.0);
  r.dv.assign(s.kv_size(), 0.0);
  const int64_t off = s.Tk - s.Tq, group = s.NH / s.NKV, hd = s.hd;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  auto qi = [&](int64_t b, int64_t t, int64_t h) { return ((b * s.Tq + t) * s.NH + h) * hd; };
  auto ki = [&](int64_t b, int64_t t, int64_t g) { return ((b * s.Tk + t) * s.NKV + g) * hd; };
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.NH; ++h) {
      const int64_t g = h / group;
      for (int64_t t = 0; t < s.Tq; ++t) {
        const int64_t lim = t + off;
        std::vector<double> p(lim + 1);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= lim; ++j) {
          double dotqk = 0.0;
          for (int64_t d = 0; d < hd; ++d)
            dotqk += static_cast<double>(q[qi(b, t, h) + d]) * k[ki(b, j, g) + d];
          p[j] = dotqk * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0.0;
        for (auto& x : p) sum += (x = std::exp(x - mx));
        for (auto& x : p) x /= sum;
        for (int64_t j = 0; j <= lim; ++j) {
          r.probs[((b * s.NH + h) * s.Tq + t) * s.Tk + j] = p[j];
          for (int64_t d = 0; d < hd; ++d) r.out[qi(b, t, h) + d] += p[j] * v[ki(b, j, g) + d];
        }
        if (dout.empty()) continue;
        // dP_j = dout . v_j; dS_j = P_j (dP_j - sum_i P_i dP_i)
        std::vector<double> dp(lim + 1);
        double rowdot = 0.0;
        for (int64_t j = 0; j <= lim; ++j) {
          for (int64_t d = 0; d < hd; ++d)
            dp[j] += static_cast<double>(dout[qi(b, t, h) + d]) * v[ki(b, j, g) + d];
          rowdot += dp[j] * p[j];
        }
        for (int64_t j = 0; j <= lim; ++j) {
          const double ds = p[j] * (dp[j] - rowdot);
          for (int64_t d = 0; d < hd; ++d) {
            r.dq[qi(b, t, h) + d] += scale * ds * k[ki(b, j, g) + d];
            r.dk[ki(b, j, g) + d] += scale * ds * q[qi(b, t, h) + d];
            r.dv[ki(b, j, g) + d] += p[j] * dout[qi(b, t, h) + d];
          }
        }
      }
    }
  return r;
}

struct Inputs {
  std::vector<float> q, k, v;
};

Inputs random_inputs(Rng& rng, const Shape& s) {
  // Scores of O(1..3): softmax far from uniform, so wrong masking or scaling shows.
  return {uniform_vec(rng, s.q_size(), -2.0f, 2.0f), uniform_vec(rng, s.kv_size(), -2.0f, 2.0f),
          uniform_vec(rng, s.kv_size())};
}

// Float32 error of a dot product over hd or Tk terms of O(1): well under 1e-5.
constexpr double kAtol = 2e-5, kRtol = 1e-4;

TEST(Attention, ForwardMatchesNaiveAndZeroesOrSkipsMaskedProbs) {
  Rng rng(test_seed());
  for (const Shape s : {Shape{2, 5, 5, 4, 2, 8}, Shape{1, 3, 7, 3, 1, 6}, Shape{2, 1, 9, 2, 2, 4},
                        Shape{1, 130, 200, 2, 1, 16}, Shape{1, 129, 129, 4, 2, 8}}) {
    SCOPED_TRACE(::testing::Message() << s);
    const auto in = random_inputs(rng, s);
    // NaN sentinels: every element of out and every visible weight must be written.
    std::vector<float> out(s.q_size(), std::nanf("")), probs(s.probs_size(), std::nanf(""));
    attention_forward(out.data(), probs.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.Tq,
                      s.Tk, s.NH, s.NKV, s.hd);
    const auto want = naive_attention(s, in.q, in.k, in.v, {});
    expect_all_close("out", out, want.out, kAtol, kRtol);
    // Past the causal limit a weight is written as an exact 0 or, far above the diagonal,
    // not written at all (the sentinel stays; the backward test shows it is never read).
    const int64_t off = s.Tk - s.Tq;
    int64_t nonzero_masked = 0;
    for (int64_t bh = 0; bh < s.B * s.NH; ++bh)
      for (int64_t t = 0; t < s.Tq; ++t)
        for (int64_t j = t + off + 1; j < s.Tk; ++j) {
          float& p = probs[(bh * s.Tq + t) * s.Tk + j];
          if (std::isnan(p)) p = 0.0f;
          nonzero_masked += p != 0.0f;
        }
    EXPECT_EQ(nonzero_masked, 0);
    expect_all_close("probs", probs, want.probs, kAtol, kRtol);
  }
}

TEST(Attention, QueriesAtAnOffsetEqualTheLastRowsOfFullAttention) {
  // The KV-cache case: Tq = 3 new queries against Tk = 70 keys must give exactly the last
  // three rows of the Tk x Tk attention over the same keys.
  Rng rng(test_seed());
  const Shape full{2, 70, 70, 4, 2, 8};
  const Shape tail{2, 3, 70, 4, 2, 8};
  const auto in = random_inputs(rng, full);
  std::vector<float> out_full(full.q_size()), probs_full(full.probs_size());
  attention_forward(out_full.data(), probs_full.data(), in.q.data(), in.k.data(), in.v.data(),
                    full.B, full.Tq, full.Tk, full.NH, full.NKV, full.hd);
  std::vector<float> q_tail;
  const int64_t row = full.NH * full.hd;
  for (int64_t b = 0; b < full.B; ++b)
    q_tail.insert(q_tail.end(), in.q.begin() + (b * full.Tq + full.Tq - tail.Tq) * row,
                  in.q.begin() + (b + 1) * full.Tq * row);
  std::vector<float> out_tail(tail.q_size()), probs_tail(tail.probs_size());
  attention_forward(out_tail.data(), probs_tail.data(), q_tail.data(), in.k.data(), in.v.data(),
                    tail.B, tail.Tq, tail.Tk, tail.NH, tail.NKV, tail.hd);
  std::vector<float> want_out, want_probs;
  for (int64_t b = 0; b < full.B; ++b) {
    want_out.insert(want_out.end(), out_full.begin() + (b * full.Tq + full.Tq - tail.Tq) * row,
                    out_full.begin() + (b + 1) * full.Tq * row);
    for (int64_t h = 0; h < full.NH; ++h) {
      const int64_t bh = b * full.NH + h;
      want_probs.insert(want_probs.end(),
                        probs_full.begin() + (bh * full.Tq + full.Tq - tail.Tq) * full.Tk,
                        probs_full.begin() + (bh + 1) * full.Tq * full.Tk);
    }
  }
  // Same math, possibly different GEMM blocking: float rounding only.
  expect_all_close("out", out_tail, want_out, 1e-6, 1e-5);
  expect_all_close("probs", probs_tail, want_probs, 1e-6, 1e-5);
}

TEST(Attention, GroupedQueryAttentionEqualsMhaWithRepeatedKvHeads) {
  // NH = 6 query heads on NKV = 2 kv heads (groups of 3) must equal MHA where kv head g is
  // copied to query heads 3g .. 3g+2; and the GQA dk, dv are the sums over each group's copies.
  Rng rng(test_seed());
  const Shape gqa{2, 6, 6, 6, 2, 4};
  const Shape mha{2, 6, 6, 6, 6, 4};
  const auto in = random_inputs(rng, gqa);
  std::vector<float> k_rep(mha.kv_size()), v_rep(mha.kv_size());
  for (int64_t bt = 0; bt < gqa.B * gqa.Tk; ++bt)
    for (int64_t h = 0; h < gqa.NH; ++h)
      for (int64_t d = 0; d < gqa.hd; ++d) {
        k_rep[(bt * mha.NKV + h) * gqa.hd + d] = in.k[(bt * gqa.NKV + h / 3) * gqa.hd + d];
        v_rep[(bt * mha.NKV + h) * gqa.hd + d] = in.v[(bt * gqa.NKV + h / 3) * gqa.hd + d];
      }
  const auto dout = uniform_vec(rng, gqa.q_size());
  std::vector<float> out_g(gqa.q_size()), probs_g(gqa.probs_size()), out_m(mha.q_size()),
      probs_m(mha.probs_size()), scratch(gqa.probs_size());
  attention_forward(out_g.data(), probs_g.data(), in.q.data(), in.k.data(), in.v.data(), gqa.B,
                    gqa.Tq, gqa.Tk, gqa.NH, gqa.NKV, gqa.hd);
  attention_forward(out_m.data(), probs_m.data(), in.q.data(), k_rep.data(), v_rep.data(), mha.B,
                    mha.Tq, mha.Tk, mha.NH, mha.NKV, mha.hd);
  expect_all_close("out", out_g, out_m, 1e-6, 1e-5);

  std::vector<float> dq_g(gqa.q_size(), 0.0f), dk_g(gqa.kv_size(), 0.0f), dv_g(gqa.kv_size(), 0.0f);
  std::vector<float> dq_m(mha.q_size(), 0.0f), dk_m(mha.kv_size(), 0.0f), dv_m(mha.kv_size(), 0.0f);
  attention_backward(dq_g.data(), dk_g.data(), dv_g.data(), scratch.data(), dout.data(),
                     in.q.data(), in.k.data(), in.v.data(), probs_g.data(), gqa.B, gqa.Tq, gqa.Tk,
                     gqa.NH, gqa.NKV, gqa.hd);
  attention_backward(dq_m.data(), dk_m.data(), dv_m.data(), scratch.data(), dout.data(),
                     in.q.data(), k_rep.data(), v_rep.data(), probs_m.data(), mha.B, mha.Tq,
                     mha.Tk, mha.NH, mha.NKV, mha.hd);
  expect_all_close("dq", dq_g, dq_m, 1e-6, 1e-5);
  std::vector<float> dk_sum(gqa.kv_size(), 0.0f), dv_sum(gqa.kv_size(), 0.0f);
  for (int64_t bt = 0; bt < gqa.B * gqa.Tk; ++bt)
    for (int64_t h = 0; h < gqa.NH; ++h)
      for (int64_t d = 0; d < gqa.hd; ++d) {
        dk_sum[(bt * gqa.NKV + h / 3) * gqa.hd + d] += dk_m[(bt * mha.NKV + h) * gqa.hd + d];
        dv_sum[(bt * gqa.NKV + h / 3) * gqa.hd + d] += dv_m[(bt * mha.NKV + h) * gqa.hd + d];
      }
  expect_all_close("dk", dk_g, dk_sum, 1e-6, 1e-5);
  expect_all_close("dv", dv_g, dv_sum, 1e-6, 1e-5);
}

TEST(Attention, BackwardMatchesFiniteDifferencesAndAddsIntoGradients) {
  Rng rng(test_seed());
  for (const Shape s :
       {Shape{2, 5, 5, 4, 2, 8}, Shape{1, 3, 7, 3, 1, 6}, Shape{1, 1, 4, 2, 1, 4}}) {
    SCOPED_TRACE(::testing::Message() << s);
    auto in = random_inputs(rng, s);
    const auto R = uniform_vec(rng, s.q_size());
    std::vector<float> out(s.q_size()), probs(s.probs_size());
    attention_forward(out.data(), probs.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.Tq,
                      s.Tk, s.NH, s.NKV, s.hd);
    const auto dq0 = uniform_vec(rng, s.q_size()), dk0 = uniform_vec(rng, s.kv_size()),
               dv0 = uniform_vec(rng, s.kv_size());
    auto dq = dq0, dk = dk0, dv = dv0;
    std::vector<float> scratch(s.probs_size(), std::nanf(""));  // "any contents"
    attention_backward(dq.data(), dk.data(), dv.data(), scratch.data(), R.data(), in.q.data(),
                       in.k.data(), in.v.data(), probs.data(), s.B, s.Tq, s.Tk, s.NH, s.NKV, s.hd);
    for (size_t i = 0; i < dq.size(); ++i) dq[i] -= dq0[i];
    for (size_t i = 0; i < dk.size(); ++i) dk[i] -= dk0[i];
    for (size_t i = 0; i < dv.size(); ++i) dv[i] -= dv0[i];
    auto loss = [&] {
      attention_forward(out.data(), probs.data(), in.q.data(), in.k.data(), in.v.data(), s.B,
                        s.Tq, s.Tk, s.NH, s.NKV, s.hd);
      return testing::dot(out, R);
    };
    testing::expect_gradient_matches("dq", in.q, dq, loss);
    testing::expect_gradient_matches("dk", in.k, dk, loss);
    testing::expect_gradient_matches("dv", in.v, dv, loss);
  }
}

TEST(Attention, BackwardMatchesNaiveAcrossBlocks) {
  // Several query and key blocks with ragged ends and an offset, where finite differences
  // would be slow: compare with the double-precision formulas instead.
  Rng rng(test_seed());
  for (const Shape s : {Shape{1, 130, 200, 4, 2, 8}, Shape{2, 129, 129, 2, 1, 16}}) {
    SCOPED_TRACE(::testing::Message() << s);
    const auto in = random_inputs(rng, s);
    const auto dout = uniform_vec(rng, s.q_size());
    // NaN in every weight and dS the kernels do not write: reading one would show in the
    // gradients.
    std::vector<float> out(s.q_size()), probs(s.probs_size(), std::nanf(""));
    std::vector<float> scratch(s.probs_size(), std::nanf(""));
    attention_forward(out.data(), probs.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.Tq,
                      s.Tk, s.NH, s.NKV, s.hd);
    std::vector<float> dq(s.q_size(), 1.0f), dk(s.kv_size(), -1.0f), dv(s.kv_size(), 0.5f);
    attention_backward(dq.data(), dk.data(), dv.data(), scratch.data(), dout.data(), in.q.data(),
                       in.k.data(), in.v.data(), probs.data(), s.B, s.Tq, s.Tk, s.NH, s.NKV, s.hd);
    auto want = naive_attention(s, in.q, in.k, in.v, dout);
    for (auto& x : want.dq) x += 1.0;
    for (auto& x : want.dk) x -= 1.0;
    for (auto& x : want.dv) x += 0.5;
    // Sums over up to 2 heads x 200 keys of float products: 1e-4 absolute.
    expect_all_close("dq", dq, want.dq, 1e-4, 1e-4);
    expect_all_close("dk", dk, want.dk, 1e-4, 1e-4);
    expect_all_close("dv", dv, want.dv, 1e-4, 1e-4);
  }
}

std::vector<float> rounded_to_bf16(const std::vector<float>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return r;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

TEST(Attention, Bf16ProductsRoundTheirInputsAndKeepTheSoftmaxInFloat32) {
  SKIP_WITHOUT_BF16();
  // Training-sized calls (Tq == Tk, several ragged blocks) and a prefill behind a cache
  // (Tq >= kGemmPrimitiveMinRows): the products take bf16 inputs. The reference is the
  // double-precision formula on the inputs rounded to bf16, so what is left is float32
  // accumulation plus the rounding of the P and dS blocks the second products read:
  // relative 2^-9 per term, a few 2^-9 of a tensor's largest value at most (2^-7 bound).
  // probs come from the first product alone (bf16 inputs, float32 sums): float32 precision.
  Rng rng(test_seed());
  for (const Shape s : {Shape{2, 130, 130, 4, 2, 16}, Shape{1, 20, 84, 2, 1, 16}}) {
    SCOPED_TRACE(::testing::Message() << s);
    const auto in = random_inputs(rng, s);
    const auto dout = uniform_vec(rng, s.q_size());
    std::vector<float> out(s.q_size()), probs(s.probs_size(), std::nanf("")), scratch(s.probs_size(), std::nanf(""));
    std::vector<float> dq(s.q_size(), 0.0f), dk(s.kv_size(), 0.0f), dv(s.kv_size(), 0.0f);
    attention_forward(out.data(), probs.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.Tq, s.Tk, s.NH,
                      s.NKV, s.hd, nullptr, GemmInput::bf16);
    attention_backward(dq.data(), dk.data(), dv.data(), scratch.data(), dout.data(), in.q.data(), in.k.data(),
                       in.v.data(), probs.data(), s.B, s.Tq, s.Tk, s.NH, s.NKV, s.hd, nullptr, GemmInput::bf16);
    const auto want = naive_attention(s, rounded_to_bf16(in.q), rounded_to_bf16(in.k), rounded_to_bf16(in.v),
                                      rounded_to_bf16(dout));
    for (auto& p : probs)
      if (std::isnan(p)) p = 0.0f;  // the masked triangle, never written (checked in float32 above)
    expect_all_close("probs", probs, want.probs, kAtol, kRtol);
    constexpr double kBlockRounding = 1.0 / 128;  // 2^-7
    expect_all_close("out", out, want.out, kBlockRounding * max_abs(want.out), 0);
    expect_all_close("dq", dq, want.dq, kBlockRounding * max_abs(want.dq), 0);
    expect_all_close("dk", dk, want.dk, kBlockRounding * max_abs(want.dk), 0);
    expect_all_close("dv", dv, want.dv, kBlockRounding * max_abs(want.dv), 0);

    // And they did run in bf16: the float32 kernel on the unrounded inputs is elsewhere, by
    // the inputs' rounding (~2^-9 relative per input), far above float32's 1e-6.
    std::vector<float> out32(s.q_size()), probs32(s.probs_size());
    std::vector<float> dq32(s.q_size(), 0.0f), dk32(s.kv_size(), 0.0f), dv32(s.kv_size(), 0.0f);
    attention_forward(out32.data(), probs32.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.Tq, s.Tk, s.NH,
                      s.NKV, s.hd);
    attention_backward(dq32.data(), dk32.data(), dv32.data(), scratch.data(), dout.data(), in.q.data(), in.k.data(),
                       in.v.data(), probs32.data(), s.B, s.Tq, s.Tk, s.NH, s.NKV, s.hd);
    EXPECT_GT(max_abs_diff(out, out32), 1e-4 * max_abs(want.out));
    EXPECT_GT(max_abs_diff(dk, dk32), 1e-4 * max_abs(want.dk));
  }
}

TEST(Attention, Bf16LeavesDecodingStepsInFloat32) {
  // A few new queries behind a cache (Tq < kGemmPrimitiveMinRows, Tk > Tq): a new key count
  // every token, so the products stay float32 there, bit for bit.
  Rng rng(test_seed());
  const Shape s{1, 3, 70, 4, 2, 16};
  const auto in = random_inputs(rng, s);
  std::vector<float> out(s.q_size()), probs(s.probs_size()), out32(s.q_size()), probs32(s.probs_size());
  attention_forward(out.data(), probs.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.Tq, s.Tk, s.NH, s.NKV,
                    s.hd, nullptr, GemmInput::bf16);
  attention_forward(out32.data(), probs32.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.Tq, s.Tk, s.NH,
                    s.NKV, s.hd);
  EXPECT_EQ(out, out32);
}

}  // namespace
}  // namespace flotilla::kernels
