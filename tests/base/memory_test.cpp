// base/memory.hpp: release_zeroed zeroes any range and gives its whole pages back.
#include "flotilla/base/memory.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>

#include "flotilla/base/buffer.hpp"

namespace flotilla {
namespace {

TEST(Memory, ReleaseZeroedZeroesExactlyTheRangeAndShrinksTheResidentSet) {
  constexpr size_t kFloats = size_t{64} << 20 >> 2;  // 64 MiB: far above any noise in VmRSS
  Buffer<float> buffer(kFloats);
  std::fill(buffer.data(), buffer.data() + kFloats, 1.5f);
  const int64_t before = current_rss_bytes();
  // An unaligned range: partial pages at both ends are zeroed in place.
  const size_t begin = 3, end = kFloats - 5;
  release_zeroed(buffer.data() + begin, (end - begin) * sizeof(float));
  const int64_t after = current_rss_bytes();
  for (size_t i = 0; i < kFloats; ++i)
    ASSERT_EQ(buffer[i], i < begin || i >= end ? 1.5f : 0.0f) << "element " << i;
  if (before > 0) EXPECT_LT(after, before - (48 << 20)) << "the pages were not handed back";
  // Written again, the pages come back and hold what is written.
  std::fill(buffer.data(), buffer.data() + kFloats, 2.0f);
  EXPECT_EQ(buffer[kFloats / 2], 2.0f);
  // Smaller than a page: zeroed, nothing else touched.
  release_zeroed(buffer.data() + 10, 7 * sizeof(float));
  EXPECT_EQ(buffer[9], 2.0f);
  EXPECT_EQ(buffer[10], 0.0f);
  EXPECT_EQ(buffer[16], 0.0f);
  EXPECT_EQ(buffer[17], 2.0f);
}

}  // namespace
}  // namespace flotilla
