#include "flotilla/comm/wire_bytes.hpp"

#include <gtest/gtest.h>

namespace flotilla::comm {
namespace {

TEST(WireBytes, AllReduceIsAReduceScatterThenAnAllGather) {
  for (int n = 1; n <= 9; ++n) {
    const int64_t total = 4096 * 9 * 8 * 7 * 5;  // divisible by every n here
    EXPECT_EQ(ring_all_reduce_bytes(total, n), ring_reduce_scatter_bytes(total, n) + ring_all_gather_bytes(total / n, n)) << n;
    EXPECT_EQ(all_reduce_ring_steps(n), 2 * scatter_gather_ring_steps(n)) << n;
    EXPECT_DOUBLE_EQ(all_reduce_wire_fraction(n) * static_cast<double>(total), static_cast<double>(ring_all_reduce_bytes(total, n)));
    EXPECT_DOUBLE_EQ(scatter_gather_wire_fraction(n) * static_cast<double>(total),
                     static_cast<double>(ring_reduce_scatter_bytes(total, n)));
  }
}

TEST(WireBytes, OneRankSendsNothingAndFourRanksTheTextbookFigures) {
  EXPECT_EQ(ring_all_reduce_bytes(1000, 1), 0);
  EXPECT_EQ(ring_all_gather_bytes(1000, 1), 0);
  EXPECT_EQ(ring_all_to_all_bytes(1000, 1), 0);
  EXPECT_EQ(all_reduce_ring_steps(1), 0);
  EXPECT_EQ(ring_all_reduce_bytes(1000, 4), 1500);     // 2(N-1)/N
  EXPECT_EQ(ring_reduce_scatter_bytes(1000, 4), 750);  // (N-1)/N
  EXPECT_EQ(ring_all_gather_bytes(250, 4), 750);       // (N-1) x each rank's part
  EXPECT_EQ(ring_all_to_all_bytes(1000, 4), 750);
}

}  // namespace
}  // namespace flotilla::comm
