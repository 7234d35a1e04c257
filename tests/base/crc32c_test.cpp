// CRC-32C against published check values, and the CPU instruction against the tables.
#include "flotilla/base/crc32c.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <string_view>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
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

// A file's checksum, read in pieces, is the checksum of its bytes in one piece, for files
// shorter than a piece, a whole number of pieces and one piece more (the last one short).
TEST(Crc32cFile, EqualsTheChecksumOfTheBytesForAnyChunkSize) {
  Rng rng(test_seed());
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("flotilla_crc32c_file_" + std::to_string(::getpid()));
  for (const size_t size : {size_t{0}, size_t{1}, size_t{7}, size_t{64}, size_t{65}, size_t{4096 + 3}}) {
    std::vector<std::byte> bytes(size);
    for (std::byte& b : bytes) b = static_cast<std::byte>(rng.below(256));
    write_file_atomic(path, bytes);
    for (const size_t chunk : {size_t{1}, size_t{8}, size_t{64}, size_t{1000}, size_t{1} << 20}) {
      const FileChecksum sum = crc32c_file(path, chunk);
      EXPECT_EQ(sum.bytes, size) << "size " << size << " chunk " << chunk;
      EXPECT_EQ(sum.crc32c, crc32c(bytes)) << "size " << size << " chunk " << chunk;
    }
    // read_file_chunks hands on full pieces, the last one alone short.
    std::vector<size_t> pieces;
    read_file_chunks(path, 64, [&](std::span<const std::byte> piece) { pieces.push_back(piece.size()); });
    ASSERT_EQ(pieces.size(), (size + 63) / 64) << "size " << size;
    for (size_t i = 0; i + 1 < pieces.size(); ++i) EXPECT_EQ(pieces[i], 64u);
    if (!pieces.empty()) EXPECT_EQ(pieces.back(), size - 64 * (pieces.size() - 1));
  }
  EXPECT_EQ(crc32c_file(path).crc32c, crc32c(MappedFile(path).bytes()));
  std::filesystem::remove(path);
}

TEST(Crc32cFile, WhatIsNotAReadableFileIsAnInputErrorNamingIt) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path();
  try {
    crc32c_file(dir);
    FAIL() << "a directory was checksummed";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(dir.string() + ": is a directory, expected a file"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(crc32c_file(dir / "flotilla_no_such_file_for_crc32c"), InputError);
}

}  // namespace
}  // namespace flotilla
