// CRC-32C against published check values, and the CPU instruction against the tables.
#include "flotilla/base/crc32c.hpp"

#include <gtest/gtest.h>

#include <string_view>
#include <vector>

#include "flotilla/base/rng.hpp"
#include "../test_seed.hpp"

namespace flotilla {
namespace {

using ::flotilla::testing::test_seed;

std::span<const std::byte> bytes_of(std::string_view s) { return std::as_bytes(std::span(s.data(), s.size())); }

TEST(Crc32c, MatchesPublishedCheckValues) {
  // The CRC catalogue's check value and RFC 3720's iSCSI test vectors.
  EXPECT_EQ(crc32c(bytes_of("123456789")), 0xE3069283u);
  EXPECT_EQ(crc32c({}), 0u);
  std::vector<std::byte> zeros(32, std::byte{0}), ones(32, std::byte{0xFF}), incrementing(32);
  for (size_t i = 0; i < 32; ++i) incrementing[i] = static_cast<std::byte>(i);
  EXPECT_EQ(crc32c(zeros), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones), 0x62A8AB43u);
  EXPECT_EQ(crc32c(incrementing), 0x46DD794Eu);
  EXPECT_EQ(crc32c_portable(bytes_of("123456789")), 0xE3069283u);
  EXPECT_EQ(crc32c_portable(incrementing), 0x46DD794Eu);
}

TEST(Crc32c, HardwareAndTablesAgreeAndChain) {
  Rng rng(test_seed());
  std::vector<std::byte> buf(5000);
  for (std::byte& b : buf) b = static_cast<std::byte>(rng.below(256));
  for (int trial = 0; trial < 200; ++trial) {
    const size_t begin = rng.below(64), len = rng.below(buf.size() - begin);
    const std::span<const std::byte> s(buf.data() + begin, len);
    ASSERT_EQ(crc32c(s), crc32c_portable(s)) << "begin " << begin << " length " << len;
    const size_t cut = len == 0 ? 0 : rng.below(len);
    EXPECT_EQ(crc32c(s.subspan(cut), crc32c(s.first(cut))), crc32c(s));
  }
}

}  // namespace
}  // namespace flotilla
