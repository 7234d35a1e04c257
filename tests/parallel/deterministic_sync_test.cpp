// The fixed-point limbs of --deterministic (parallel/deterministic_sync.hpp): a float32 is
// held to 2^-49, sums of limbs are exact integers whatever their order, and values out of
// range are refused.
#include "flotilla/parallel/deterministic_sync.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <random>
#include <vector>

#include "../test_seed.hpp"

namespace flotilla::parallel {
namespace {

// A float32 of random sign and magnitude 2^e, e uniform in [lo, hi].
float random_float(std::mt19937_64& rng, int lo, int hi) {
  std::uniform_int_distribution<int> exponent(lo, hi);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  const float v = std::ldexp(mantissa(rng), exponent(rng));
  return (rng() & 1) ? -v : v;
}

TEST(FixedLimbs, HoldAFloatToHalfAUnitOf2ToTheMinus48) {
  std::mt19937_64 rng(testing::test_seed());
  for (int i = 0; i < 100000; ++i) {
    const float x = random_float(rng, -60, 30);
    FixedLimbs l;
    ASSERT_TRUE(to_fixed(x, l)) << x;
    EXPECT_GE(l.lo, 0);
    EXPECT_LE(l.lo, int64_t{1} << 32);
    // Rounded to the nearest multiple of 2^-48: at most half of one off (and exact when x's
    // last bit is at or above 2^-48, i.e. |x| >= 2^-25).
    const double back = from_fixed(l.hi, l.lo);
    EXPECT_LE(std::fabs(back - x), 0x1p-49) << x;
    if (std::fabs(x) >= 0x1p-25) EXPECT_EQ(back, static_cast<double>(x)) << x;
  }
}

TEST(FixedLimbs, SumsAreTheSameBitsInAnyOrderAndGrouping) {
  std::mt19937_64 rng(testing::test_seed());
  // 4096 rows of one element, of mixed magnitudes: a float32 sum of them depends on the
  // order; the limbs' integer sums must not.
  std::vector<float> rows(4096);
  for (float& x : rows) x = random_float(rng, -40, 20);
  auto limb_sum = [](const std::vector<float>& xs, size_t groups) {
    // Summed in `groups` partial sums (ranks), then the partials added (the all-reduce).
    std::vector<FixedLimbs> partial(groups);
    for (size_t i = 0; i < xs.size(); ++i) {
      FixedLimbs l;
      EXPECT_TRUE(to_fixed(xs[i], l));
      partial[i % groups].hi += l.hi;
      partial[i % groups].lo += l.lo;
    }
    FixedLimbs total;
    for (const FixedLimbs& p : partial) {
      total.hi += p.hi;
      total.lo += p.lo;
    }
    return static_cast<float>(from_fixed(total.hi, total.lo));
  };
  const float reference = limb_sum(rows, 1);
  double exact = 0.0;  // long double would do too: for the error bound only
  for (float x : rows) exact += x;
  EXPECT_NEAR(reference, exact, std::fabs(exact) * 1e-6 + 4096 * 0x1p-49);
  for (int trial = 0; trial < 20; ++trial) {
    std::shuffle(rows.begin(), rows.end(), rng);
    const size_t groups = 1 + rng() % 7;
    const float sum = limb_sum(rows, groups);
    EXPECT_EQ(std::bit_cast<uint32_t>(sum), std::bit_cast<uint32_t>(reference)) << groups << " groups";
  }
}

TEST(FixedLimbs, RefuseWhatIsNotFiniteOrOutOfRange) {
  FixedLimbs l{7, 9};
  EXPECT_FALSE(to_fixed(std::numeric_limits<double>::quiet_NaN(), l));
  EXPECT_FALSE(to_fixed(std::numeric_limits<double>::infinity(), l));
  EXPECT_FALSE(to_fixed(-std::numeric_limits<double>::infinity(), l));
  EXPECT_FALSE(to_fixed(kFixedMaxMagnitude * 2.0, l));
  EXPECT_FALSE(to_fixed(-kFixedMaxMagnitude * 2.0, l));
  EXPECT_EQ(l.hi, 7);  // untouched
  EXPECT_EQ(l.lo, 9);
  // The edges of the range, and the most rows a global batch may hold, do not overflow.
  ASSERT_TRUE(to_fixed(-kFixedMaxMagnitude, l));
  const __int128 rows = kMaxDeterministicRows;
  const __int128 hi_sum = static_cast<__int128>(l.hi) * rows;
  EXPECT_GT(hi_sum, static_cast<__int128>(std::numeric_limits<int64_t>::min()));
  EXPECT_EQ(from_fixed(l.hi, l.lo), -kFixedMaxMagnitude);
  ASSERT_TRUE(to_fixed(kFixedMaxMagnitude, l));
  EXPECT_LT(static_cast<__int128>(l.hi) * rows + static_cast<__int128>(l.lo) * rows / (__int128{1} << 32),
            static_cast<__int128>(std::numeric_limits<int64_t>::max()));
}

TEST(FixedLimbs, ATinyNegativeValueCarriesIntoHi) {
  // floor(-2^-60 * 2^16) = -1 and the fraction rounds to a whole 2^32: the value is 0 to
  // within 2^-49, and its limbs still add exactly.
  FixedLimbs l;
  ASSERT_TRUE(to_fixed(-0x1p-60, l));
  EXPECT_EQ(l.hi, -1);
  EXPECT_EQ(l.lo, int64_t{1} << 32);
  EXPECT_EQ(from_fixed(l.hi, l.lo), 0.0);
}

// The clipping norm: an exact integer sum of squares, the same bits however the arena is
// cut into ranks' parts (ZeRO's shards move with the world size).
TEST(FixedSquares, TheSumIsTheSameForAnyPartition) {
  std::mt19937_64 rng(testing::test_seed());
  std::vector<float> g(20000);
  for (float& x : g) x = random_float(rng, -40, 8);
  const std::optional<__int128> whole = fixed_sum_squares(g);
  ASSERT_TRUE(whole.has_value());
  double exact = 0.0;
  for (float x : g) exact += static_cast<double>(x) * x;
  // Truncation drops under 2^-56 per element; double rounding of the reference ~1e-16.
  EXPECT_NEAR(static_cast<double>(*whole) / kSquareScale, exact, exact * 1e-12 + 20000 * 0x1p-56);
  for (int trial = 0; trial < 20; ++trial) {
    const size_t parts = 1 + rng() % 6;
    std::vector<size_t> cuts = {0, g.size()};
    for (size_t p = 1; p < parts; ++p) cuts.push_back(rng() % g.size());
    std::sort(cuts.begin(), cuts.end());
    __int128 total = 0;
    for (size_t p = 0; p + 1 < cuts.size(); ++p) {
      const std::optional<__int128> part =
          fixed_sum_squares(std::span<const float>(g).subspan(cuts[p], cuts[p + 1] - cuts[p]));
      ASSERT_TRUE(part.has_value());
      total += *part;
    }
    EXPECT_TRUE(total == *whole) << parts << " parts";
  }
}

TEST(FixedSquares, ADivergedElementReadsAsNoSum) {
  std::vector<float> g(100, 0.5f);
  EXPECT_TRUE(fixed_sum_squares(g).has_value());
  g[37] = 0x1p17f;  // beyond the range of one element
  EXPECT_FALSE(fixed_sum_squares(g).has_value());
  g[37] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(fixed_sum_squares(g).has_value());
}

}  // namespace
}  // namespace flotilla::parallel
