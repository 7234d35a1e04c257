// Row balancing: how the global batch is cut by speed (in closed form) and how thread ranks
// agree on the cut after a window.
#include "flotilla/parallel/row_balance.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <numeric>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/thread/thread_group.hpp"

namespace flotilla::parallel {
namespace {

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

TEST(SplitRowsBySpeed, EqualSpeedsGiveEqualSharesAndTheRemainderToLowRanks) {
  const std::vector<double> equal(3, 2.5);
  EXPECT_EQ(split_rows_by_speed(12, equal, 1), (std::vector<int64_t>{4, 4, 4}));
  EXPECT_EQ(split_rows_by_speed(13, equal, 1), (std::vector<int64_t>{5, 4, 4}));
  EXPECT_EQ(split_rows_by_speed(14, equal, 1), (std::vector<int64_t>{5, 5, 4}));
}

TEST(SplitRowsBySpeed, SharesFollowSpeedAboveTheMinimum) {
  // 16 rows, 1 each first, 14 spare in 1:3 -> 3.5 and 10.5: tie of remainders to rank 0.
  EXPECT_EQ(split_rows_by_speed(16, std::vector<double>{1.0, 3.0}, 1), (std::vector<int64_t>{5, 11}));
  // 3x slower rank 1 of three: spare 9 in 3:1:3 -> 3.857, 1.286, 3.857 -> 4, 1, 4.
  EXPECT_EQ(split_rows_by_speed(12, std::vector<double>{3.0, 1.0, 3.0}, 1), (std::vector<int64_t>{5, 2, 5}));
  // A very slow rank keeps its minimum.
  EXPECT_EQ(split_rows_by_speed(8, std::vector<double>{1000.0, 1e-6}, 2), (std::vector<int64_t>{6, 2}));
}

TEST(SplitRowsBySpeed, BadSpeedsCountAsTheMeanOfTheOthers) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(split_rows_by_speed(12, std::vector<double>{2.0, nan, 4.0}, 0), (std::vector<int64_t>{3, 4, 5}));
  EXPECT_EQ(split_rows_by_speed(7, std::vector<double>{0.0, -1.0}, 1), (std::vector<int64_t>{4, 3}));
}

TEST(SplitRowsBySpeed, AlwaysAddsUpForRandomSpeeds) {
  uint64_t x = 12345;  // a fixed LCG: the same cases every run
  for (int trial = 0; trial < 2000; ++trial) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    const int n = 1 + static_cast<int>((x >> 33) % 7);
    const int64_t min_rows = static_cast<int64_t>((x >> 40) % 3);
    const int64_t rows = min_rows * n + static_cast<int64_t>((x >> 20) % 50);
    std::vector<double> speeds(static_cast<size_t>(n));
    for (double& s : speeds) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      s = static_cast<double>((x >> 11) % 100000) / 37.0;
    }
    const std::vector<int64_t> shares = split_rows_by_speed(rows, speeds, min_rows);
    ASSERT_EQ(sum(shares), rows) << "trial " << trial;
    for (const int64_t s : shares) ASSERT_GE(s, min_rows) << "trial " << trial;
  }
}

TEST(SplitRowsBySpeed, RefusesTooFewRows) {
  EXPECT_THROW(split_rows_by_speed(3, std::vector<double>{1.0, 1.0}, 2), Error);
  EXPECT_THROW(split_rows_by_speed(3, std::vector<double>{}, 0), Error);
}

TEST(RowBalancer, RanksAgreeOnTheCutAtTheEndOfEachWindow) {
  // Rank 2 runs at a third of the others' speed; every rank must see the same shares.
  const int world = 3;
  std::vector<std::vector<int64_t>> seen(world);
  comm::Settings settings;
  settings.timeout = std::chrono::seconds(30);
  comm::run_threads(world, [&](comm::Communicator& comm) {
    RowBalancer balancer(&comm, {.global_rows = 12, .min_rows = 1, .every = 2, .smoothing = 0.5});
    EXPECT_EQ(balancer.shares(), (std::vector<int64_t>{4, 4, 4}));
    const double seconds_per_row = comm.rank() == 2 ? 3.0 : 1.0;
    for (int64_t step = 1; step <= 4; ++step) {
      const int64_t rows = balancer.share(comm.rank());
      balancer.record(rows, static_cast<double>(rows) * seconds_per_row);
      const bool changed = balancer.after_step(step);
      EXPECT_EQ(changed, step == 2);  // the second window measures the same speeds
    }
    // Spare 9 in 3:3:1 -> 3.857, 3.857, 1.286: 5, 5, 2.
    EXPECT_EQ(balancer.first_row(2), 10);
    seen[static_cast<size_t>(comm.rank())] = balancer.shares();
  }, settings);
  for (int r = 0; r < world; ++r) EXPECT_EQ(seen[static_cast<size_t>(r)], (std::vector<int64_t>{5, 5, 2}));
}

TEST(RowBalancer, RefusesAGlobalBatchSmallerThanTheMinimum) {
  EXPECT_THROW(RowBalancer(nullptr, {.global_rows = 1, .min_rows = 2, .every = 5}), InputError);
  EXPECT_THROW(RowBalancer(nullptr, {.global_rows = 4, .min_rows = 1, .every = 0}), InputError);
}

}  // namespace
}  // namespace flotilla::parallel
