// Packed rows: attention with key_start must compute, for every example packed into a row,
// exactly what that example computes alone — forward and backward — and its gradient
// must match finite differences.
#include <gtest/gtest.h>

#include <vector>

#include "flotilla/kernels/kernels.hpp"
#include "../requires_bf16.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {
using testing::expect_gradient_matches;
using testing::test_seed;
using testing::uniform_vec;

struct PackedShape {
  int64_t T, NH, NKV, hd;
};

// One row (B = 1) of T tokens packed from examples of the given lengths.
std::vector<int32_t> key_starts(const std::vector<int64_t>& lengths) {
  std::vector<int32_t> starts;
  int32_t start = 0;
  for (int64_t len : lengths) {
    for (int64_t i = 0; i < len; ++i) starts.push_back(start);
    start += static_cast<int32_t>(len);
  }
  return starts;
}

// Packed examples against each example alone, in the format `input` (tolerance: float32
// rounding; in bf16 the P and dS blocks may round differently when the blocking differs,
// 2^-8 of these O(1) values).
void expect_each_example_equals_attention_alone(GemmInput input, double tol) {
  Rng rng(test_seed());
  // Lengths cross the 64-row block boundary so a block holds two examples.
  const std::vector<int64_t> lengths = {5, 70, 1, 33};
  const PackedShape s{5 + 70 + 1 + 33, 4, 2, 8};
  const int64_t dq = s.NH * s.hd, dkv = s.NKV * s.hd;
  auto q = uniform_vec(rng, static_cast<size_t>(s.T * dq));
  auto k = uniform_vec(rng, static_cast<size_t>(s.T * dkv));
  auto v = uniform_vec(rng, static_cast<size_t>(s.T * dkv));
  auto dout = uniform_vec(rng, static_cast<size_t>(s.T * dq));
  const std::vector<int32_t> starts = key_starts(lengths);

  std::vector<float> out(q.size()), probs(static_cast<size_t>(s.NH * s.T * s.T));
  attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), 1, s.T, s.T, s.NH, s.NKV, s.hd,
                    starts.data(), input);
  std::vector<float> dq_(q.size(), 0.0f), dk_(k.size(), 0.0f), dv_(v.size(), 0.0f), scratch(probs.size());
  attention_backward(dq_.data(), dk_.data(), dv_.data(), scratch.data(), dout.data(), q.data(), k.data(),
                     v.data(), probs.data(), 1, s.T, s.T, s.NH, s.NKV, s.hd, starts.data(), input);

  int64_t start = 0;
  for (int64_t len : lengths) {
    std::vector<float> o1(static_cast<size_t>(len * dq)), p1(static_cast<size_t>(s.NH * len * len));
    attention_forward(o1.data(), p1.data(), q.data() + start * dq, k.data() + start * dkv,
                      v.data() + start * dkv, 1, len, len, s.NH, s.NKV, s.hd, nullptr, input);
    std::vector<float> dq1(o1.size(), 0.0f), dk1(static_cast<size_t>(len * dkv), 0.0f), dv1(dk1.size(), 0.0f);
    std::vector<float> scratch1(p1.size());
    attention_backward(dq1.data(), dk1.data(), dv1.data(), scratch1.data(), dout.data() + start * dq,
                       q.data() + start * dq, k.data() + start * dkv, v.data() + start * dkv, p1.data(), 1, len,
                       len, s.NH, s.NKV, s.hd, nullptr, input);
    // Same arithmetic on the same keys, but GEMM blocking can differ: float rounding only.
    for (size_t i = 0; i < o1.size(); ++i) ASSERT_NEAR(out[start * dq + i], o1[i], tol) << "example at " << start;
    for (size_t i = 0; i < dq1.size(); ++i) ASSERT_NEAR(dq_[start * dq + i], dq1[i], tol);
    for (size_t i = 0; i < dk1.size(); ++i) ASSERT_NEAR(dk_[start * dkv + i], dk1[i], tol);
    for (size_t i = 0; i < dv1.size(); ++i) ASSERT_NEAR(dv_[start * dkv + i], dv1[i], tol);
    // No weight may leak to another example's keys.
    for (int64_t h = 0; h < s.NH; ++h)
      for (int64_t t = start; t < start + len; ++t)
        for (int64_t j = 0; j < s.T; ++j)
          if (j < start || j > t) ASSERT_EQ(probs[(h * s.T + t) * s.T + j], 0.0f);
    start += len;
  }
}

TEST(AttentionPacked, EachExampleEqualsAttentionAlone) { expect_each_example_equals_attention_alone(GemmInput::f32, 1e-5); }

TEST(AttentionPacked, EachExampleEqualsAttentionAloneInBf16) {
  SKIP_WITHOUT_BF16();
  expect_each_example_equals_attention_alone(GemmInput::bf16, 1.0 / 256);
}

TEST(AttentionPacked, BackwardMatchesFiniteDifferences) {
  Rng rng(test_seed());
  const std::vector<int64_t> lengths = {3, 4, 2};
  const PackedShape s{9, 4, 2, 4};
  const int64_t B = 2;  // two rows with different packings
  std::vector<int32_t> starts = key_starts(lengths);
  const std::vector<int32_t> row2 = key_starts({6, 3});
  starts.insert(starts.end(), row2.begin(), row2.end());
  const int64_t dq = s.NH * s.hd, dkv = s.NKV * s.hd;
  auto q = uniform_vec(rng, static_cast<size_t>(B * s.T * dq));
  auto k = uniform_vec(rng, static_cast<size_t>(B * s.T * dkv));
  auto v = uniform_vec(rng, static_cast<size_t>(B * s.T * dkv));
  auto R = uniform_vec(rng, q.size());
  std::vector<float> out(q.size()), probs(static_cast<size_t>(B * s.NH * s.T * s.T));
  auto loss = [&] {
    attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), B, s.T, s.T, s.NH, s.NKV, s.hd,
                      starts.data());
    return testing::dot(out, R);
  };
  loss();
  std::vector<float> dq_(q.size(), 0.0f), dk_(k.size(), 0.0f), dv_(v.size(), 0.0f), scratch(probs.size());
  attention_backward(dq_.data(), dk_.data(), dv_.data(), scratch.data(), R.data(), q.data(), k.data(), v.data(),
                     probs.data(), B, s.T, s.T, s.NH, s.NKV, s.hd, starts.data());
  expect_gradient_matches("dq", q, dq_, loss);
  expect_gradient_matches("dk", k, dk_, loss);
  expect_gradient_matches("dv", v, dv_, loss);
}

TEST(RopePositions, RestartedPositionsEqualTheTableRows) {
  Rng rng(test_seed());
  const int64_t T = 6, NH = 2, hd = 8;
  std::vector<float> inv(hd / 2), cos(T * hd / 2), sin(T * hd / 2);
  rope_inv_freq(inv.data(), hd, 10000.0f, RopeScaling{});
  rope_table(cos.data(), sin.data(), inv.data(), 0, T, hd);
  const std::vector<int32_t> positions = {0, 1, 2, 0, 1, 0};
  auto x = uniform_vec(rng, static_cast<size_t>(T * NH * hd));
  std::vector<float> packed = x;
  rope_forward(packed.data(), cos.data(), sin.data(), 1, T, NH, hd, positions.data());
  // Token 4 (position 1) must be rotated as token 1 of an unpacked row.
  std::vector<float> alone(x.begin(), x.begin() + 2 * NH * hd);
  std::copy(x.begin() + 4 * NH * hd, x.begin() + 5 * NH * hd, alone.begin() + NH * hd);
  rope_forward(alone.data(), cos.data(), sin.data(), 1, 2, NH, hd);
  for (int64_t i = 0; i < NH * hd; ++i) EXPECT_EQ(packed[4 * NH * hd + i], alone[NH * hd + i]);
  // And backward is the exact inverse rotation at the same positions.
  rope_backward(packed.data(), cos.data(), sin.data(), 1, T, NH, hd, positions.data());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(packed[i], x[i], 1e-6);
}

}  // namespace
}  // namespace flotilla::kernels
