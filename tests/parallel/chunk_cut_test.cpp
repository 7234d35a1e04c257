// The one chunk-and-tail cut of every ZeRO stage (parallel/chunk_cut.hpp): for every range
// length 0..40 at offsets 0 and 7 and every world 1..5 (non-powers of two, ranges shorter
// than the world), in closed form: each rank's chunk is floor(n / N) floats at begin + r c,
// the tail is the rest (fewer than N floats), the ranks' sole-owned ranges tile the range
// exactly once, and what a rank owns is ascending.
#include "flotilla/parallel/chunk_cut.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace flotilla::parallel {
namespace {

TEST(ChunkCut, ChunksAndTheTailInClosedForm) {
  for (const int64_t begin : {int64_t{0}, int64_t{7}}) {
    for (int64_t n = 0; n <= 40; ++n) {
      for (int64_t world = 1; world <= 5; ++world) {
        SCOPED_TRACE(::testing::Message() << "begin " << begin << ", n " << n << ", world " << world);
        const ChunkCut cut(begin, begin + n, world);
        EXPECT_EQ(cut.chunk, n / world);
        EXPECT_EQ(cut.tail_size(), n % world);
        EXPECT_EQ(cut.tail().begin, begin + world * (n / world));
        EXPECT_EQ(cut.tail().end, begin + n);
        EXPECT_EQ(cut.chunks().size(), world * (n / world));
        for (int64_t r = 0; r < world; ++r) {
          EXPECT_EQ(cut.chunk_of(r).begin, begin + r * (n / world));
          EXPECT_EQ(cut.chunk_of(r).size(), n / world);
        }
      }
    }
  }
}

TEST(ChunkCut, SoleOwnedRangesTileTheRangeOnceAndOwnedAddsTheTail) {
  for (int64_t n = 0; n <= 40; ++n) {
    for (int64_t world = 1; world <= 5; ++world) {
      SCOPED_TRACE(::testing::Message() << "n " << n << ", world " << world);
      const int64_t begin = 3;
      const ChunkCut cut(begin, begin + n, world);
      std::vector<int> sole_count(static_cast<size_t>(n), 0), owned_count(static_cast<size_t>(n), 0);
      for (int64_t r = 0; r < world; ++r) {
        std::vector<model::ElementRange> owned, sole;
        cut.append_owned(owned, r);
        cut.append_sole_owned(sole, r);
        for (size_t i = 0; i + 1 < owned.size(); ++i) EXPECT_LE(owned[i].end, owned[i + 1].begin);
        for (const model::ElementRange& e : owned) {
          EXPECT_GT(e.size(), 0);  // no empty ranges
          for (int64_t i = e.begin; i < e.end; ++i) ++owned_count[static_cast<size_t>(i - begin)];
        }
        for (const model::ElementRange& e : sole)
          for (int64_t i = e.begin; i < e.end; ++i) ++sole_count[static_cast<size_t>(i - begin)];
      }
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_EQ(sole_count[static_cast<size_t>(i)], 1) << "float " << i;
        // The tail is every rank's; a chunk's float one rank's.
        EXPECT_EQ(owned_count[static_cast<size_t>(i)], i >= world * (n / world) ? world : 1) << "float " << i;
      }
    }
  }
}

}  // namespace
}  // namespace flotilla::parallel
