// sum_squares (double accumulation, thread-count independent), scale_inplace, add_inplace.
#include <gtest/gtest.h>
#include <omp.h>

#include <vector>

#include "flotilla/kernels/kernels.hpp"
#include "kernel_test_util.hpp"

namespace flotilla::kernels {
namespace {

using testing::test_seed;
using testing::uniform_vec;

TEST(VectorOps, SumSquaresAccumulatesInDouble) {
  // 1e8 + 1000 * 1: in float, 1e8 + 1 rounds back to 1e8 (spacing 8), so float
  // accumulation loses the ones; double keeps them exactly.
  std::vector<float> x(1001, 1.0f);
  x[0] = 1e4f;
  EXPECT_EQ(sum_squares(x.data(), static_cast<int64_t>(x.size())), 1e8 + 1000.0);
  EXPECT_EQ(sum_squares(x.data(), 0), 0.0);
}

TEST(VectorOps, SumSquaresIsIndependentOfThreadCount) {
  Rng rng(test_seed());
  const int64_t n = 1000003;  // parallel path, uneven chunks
  const auto x = uniform_vec(rng, n);
  double want = 0.0;
  for (float v : x) want += static_cast<double>(v) * v;
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double one = sum_squares(x.data(), n);
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    EXPECT_EQ(sum_squares(x.data(), n), one) << "threads=" << threads;
  }
  omp_set_num_threads(saved);
  EXPECT_NEAR(one, want, 1e-9 * want);
}

TEST(VectorOps, ScaleAndAddInplace) {
  Rng rng(test_seed());
  for (int64_t n : {int64_t{0}, int64_t{13}, int64_t{200001}}) {
    const auto x = uniform_vec(rng, n), y0 = uniform_vec(rng, n);
    auto y = y0;
    add_inplace(y.data(), x.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[i], y0[i] + x[i]) << i;
    y = y0;
    scale_inplace(y.data(), n, -0.75f);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[i], y0[i] * -0.75f) << i;
  }
}

TEST(VectorOps, DropoutOnAColumnBlockKeepsWhatTheWholeTensorKeeps) {
  // A (rows, 12) tensor cut into three blocks of 4 columns: each block's forward and
  // backward equal the whole tensor's on those columns, bit for bit (the same hash).
  Rng rng(test_seed());
  const int64_t rows = 5, full = 12, cols = 4;
  const float p = 0.3f;
  const uint64_t seed = 77;
  const auto x = uniform_vec(rng, static_cast<size_t>(rows * full));
  std::vector<float> whole(x.size());
  dropout_forward(whole.data(), x.data(), rows * full, p, seed);
  std::vector<float> dwhole(x.size(), 0.5f);
  dropout_backward(dwhole.data(), x.data(), rows * full, p, seed);
  int dropped = 0;
  for (int64_t first = 0; first < full; first += cols) {
    std::vector<float> in(static_cast<size_t>(rows * cols)), out(in.size()), din(in.size(), 0.5f);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) in[static_cast<size_t>(i * cols + j)] = x[static_cast<size_t>(i * full + first + j)];
    dropout_forward_columns(out.data(), in.data(), rows, cols, full, first, p, seed);
    dropout_backward_columns(din.data(), in.data(), rows, cols, full, first, p, seed);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        const auto w = static_cast<size_t>(i * full + first + j), b = static_cast<size_t>(i * cols + j);
        EXPECT_EQ(out[b], whole[w]) << "row " << i << ", column " << first + j;
        EXPECT_EQ(din[b], dwhole[w]) << "row " << i << ", column " << first + j;
        dropped += whole[w] == 0.0f ? 1 : 0;
      }
  }
  EXPECT_GT(dropped, 0);  // the masks compared drop something
}

}  // namespace
}  // namespace flotilla::kernels
