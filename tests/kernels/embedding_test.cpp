// embedding: forward is a row gather; backward a scatter-add that must be deterministic.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "flotilla/kernels/kernels.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::test_seed;
using testing::uniform_vec;

std::vector<int32_t> random_tokens(Rng& rng, int64_t N, int64_t V) {
  std::vector<int32_t> t(N);
  for (auto& x : t) x = static_cast<int32_t>(rng.below(V));
  return t;
}

TEST(Embedding, ForwardGathersRows) {
  Rng rng(test_seed());
  const int64_t N = 9, C = 5, V = 4;
  const auto wte = uniform_vec(rng, V * C);
  const auto tokens = random_tokens(rng, N, V);
  std::vector<float> out(N * C, std::nanf(""));
  embedding_forward(out.data(), tokens.data(), wte.data(), N, C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) EXPECT_EQ(out[n * C + c], wte[tokens[n] * C + c]);
}

TEST(Embedding, BackwardMatchesFiniteDifferencesAndAddsIntoGradient) {
  Rng rng(test_seed());
  const int64_t N = 11, C = 3, V = 5;  // N > V: tokens repeat
  auto wte = uniform_vec(rng, V * C);
  const auto tokens = random_tokens(rng, N, V);
  const auto R = uniform_vec(rng, N * C);
  const auto dwte0 = uniform_vec(rng, V * C);
  auto dwte = dwte0;
  embedding_backward(dwte.data(), R.data(), tokens.data(), N, C);
  for (size_t i = 0; i < dwte.size(); ++i) dwte[i] -= dwte0[i];
  std::vector<float> out(N * C);
  testing::expect_gradient_matches("dwte", wte, dwte, [&] {
    embedding_forward(out.data(), tokens.data(), wte.data(), N, C);
    return testing::dot(out, R);
  });
}

TEST(Embedding, BackwardIsBitwiseIndependentOfThreadCount) {
  // Large enough for the parallel path, few tokens so that every row of dwte sums many
  // rows of dout (where a racy or reordered sum would show in the last bits), and an odd C
  // so the per-thread column ranges do not divide evenly.
  Rng rng(test_seed());
  const int64_t N = 700, C = 201, V = 7;
  const auto tokens = random_tokens(rng, N, V);
  const auto dout = uniform_vec(rng, N * C);
  const auto dwte0 = uniform_vec(rng, V * C);
  // The reference: sequential float sums in row order n = 0..N-1.
  auto want = dwte0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) want[tokens[n] * C + c] += dout[n * C + c];
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3, 4}) {
    omp_set_num_threads(threads);
    auto dwte = dwte0;
    embedding_backward(dwte.data(), dout.data(), tokens.data(), N, C);
    EXPECT_EQ(std::memcmp(dwte.data(), want.data(), want.size() * sizeof(float)), 0)
        << "threads=" << threads;
  }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace flotilla::kernels
