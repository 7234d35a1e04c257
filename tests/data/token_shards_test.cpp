// Token shards: write -> read round trip, and strict refusal of corrupt or truncated files.
#include "flotilla/data/token_shards.hpp"

#include <gtest/gtest.h>

#include <cstring>

#include "data_test_util.hpp"
#include "flotilla/base/rng.hpp"

namespace flotilla::data {
namespace {

namespace fs = std::filesystem;
using test_util::input_error_of;
using test_util::read_file;
using test_util::TempDir;
using ::testing::HasSubstr;

struct Example {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
};

// Lengths that put example boundaries at every bit position of the mask bytes, and an
// empty example.
std::vector<Example> random_examples(uint64_t seed, uint32_t vocab) {
  Rng rng(seed);
  std::vector<Example> out;
  for (size_t n : {5, 11, 0, 3, 8, 1, 17, 64, 9}) {
    Example e;
    for (size_t i = 0; i < n; ++i) {
      e.tokens.push_back(static_cast<int32_t>(rng.below(vocab)));
      e.mask.push_back(static_cast<uint8_t>(rng.below(2)));
    }
    out.push_back(std::move(e));
  }
  return out;
}

fs::path write_shard(const fs::path& path, const std::vector<Example>& examples, uint32_t vocab = 1000,
                     std::string fingerprint = "fp-test") {
  ShardWriter w(std::move(fingerprint), vocab);
  for (const Example& e : examples) w.add(e.tokens, e.mask);
  const uint64_t bytes = w.write(path);
  EXPECT_EQ(bytes, fs::file_size(path));
  return path;
}

void overwrite(const fs::path& path, size_t offset, const void* data, size_t n) {
  std::string bytes = read_file(path);
  std::memcpy(bytes.data() + offset, data, n);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

TEST(TokenShards, RoundTripKeepsTokensAndMaskBits) {
  const uint64_t seed = 20261125;
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  const auto examples = random_examples(seed, 1000);
  const fs::path path = write_shard(dir.path() / "s.fltk", examples);
  const ShardReader r(path);
  EXPECT_EQ(r.fingerprint(), "fp-test");
  EXPECT_EQ(r.vocab_size(), 1000u);
  ASSERT_EQ(r.num_examples(), examples.size());
  uint64_t total = 0;
  for (size_t i = 0; i < examples.size(); ++i) {
    const ExampleView v = r.example(i);
    ASSERT_EQ(v.tokens.size(), examples[i].tokens.size()) << "example " << i;
    ASSERT_EQ(v.mask.size(), examples[i].tokens.size());
    std::vector<uint8_t> unpacked(v.mask.size());
    v.mask.unpack(unpacked);
    for (size_t t = 0; t < v.tokens.size(); ++t) {
      EXPECT_EQ(static_cast<int32_t>(v.tokens[t]), examples[i].tokens[t]);
      EXPECT_EQ(v.mask[t], examples[i].mask[t] != 0);
      EXPECT_EQ(unpacked[t], examples[i].mask[t]);
    }
    size_t ones = 0;
    for (uint8_t m : examples[i].mask) ones += m;
    EXPECT_EQ(v.mask.count(), ones);
    total += v.tokens.size();
  }
  EXPECT_EQ(r.num_tokens(), total);
  // Header + offsets + 4 bytes per token + 1 bit per token.
  EXPECT_EQ(r.file_bytes(), 256 + 8 * (examples.size() + 1) + 4 * total + (total + 7) / 8);
}

TEST(TokenShards, EmptyShardRoundTrips) {
  TempDir dir;
  const ShardReader r(write_shard(dir.path() / "e.fltk", {}));
  EXPECT_EQ(r.num_examples(), 0u);
  EXPECT_EQ(r.num_tokens(), 0u);
}

TEST(TokenShards, HeaderIsAtTheDocumentedOffsets) {
  TempDir dir;
  const fs::path path = write_shard(dir.path() / "s.fltk", {{{1, 2, 3}, {0, 1, 1}}}, 77, "abc");
  const std::string bytes = read_file(path);
  EXPECT_EQ(bytes.substr(0, 8), "FLTKSHRD");
  uint32_t u32 = 0;
  uint64_t u64 = 0;
  std::memcpy(&u32, bytes.data() + 8, 4);
  EXPECT_EQ(u32, 1u);  // version
  std::memcpy(&u32, bytes.data() + 12, 4);
  EXPECT_EQ(u32, 256u);  // header bytes
  EXPECT_EQ(std::string(bytes.data() + 16, 4), std::string("abc\0", 4));
  std::memcpy(&u64, bytes.data() + 144, 8);
  EXPECT_EQ(u64, 1u);  // examples
  std::memcpy(&u64, bytes.data() + 152, 8);
  EXPECT_EQ(u64, 3u);  // tokens
  std::memcpy(&u32, bytes.data() + 160, 4);
  EXPECT_EQ(u32, 77u);  // vocab
  EXPECT_EQ(static_cast<uint8_t>(bytes[256 + 16 + 12]), 0b110);  // mask bits, LSB first
}

TEST(TokenShards, FingerprintMustFitTheHeader) {
  EXPECT_THAT(input_error_of([] { ShardWriter(std::string(129, 'a'), 10); }), HasSubstr("1 to 128 printable ASCII"));
  EXPECT_NO_THROW(ShardWriter(std::string(128, 'a'), 10));
}

class CorruptShard : public ::testing::Test {
 protected:
  void SetUp() override { path_ = write_shard(dir_.path() / "bad.fltk", random_examples(7, 1000)); }
  std::string open_error() const { return input_error_of([&] { ShardReader r(path_); }); }
  TempDir dir_;
  fs::path path_;
};

TEST_F(CorruptShard, BadMagic) {
  overwrite(path_, 0, "XXXXXXXX", 8);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk: not a flotilla token shard"));
}

TEST_F(CorruptShard, UnknownVersion) {
  const uint32_t v = 9;
  overwrite(path_, 8, &v, 4);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk: shard format version 9"));
}

TEST_F(CorruptShard, TruncatedFile) {
  fs::resize_file(path_, fs::file_size(path_) - 1);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk:"));
  EXPECT_THAT(open_error(), HasSubstr("(truncated)"));
}

TEST_F(CorruptShard, TruncatedInsideTheHeader) {
  fs::resize_file(path_, 100);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk: 100 bytes is shorter than the 256-byte shard header"));
}

TEST_F(CorruptShard, EmptyFile) {
  fs::resize_file(path_, 0);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk: 0 bytes"));
}

TEST_F(CorruptShard, TrailingBytes) {
  std::ofstream(path_, std::ios::binary | std::ios::app) << "x";
  EXPECT_THAT(open_error(), HasSubstr("needs exactly"));
}

TEST_F(CorruptShard, HugeCountsInTheHeader) {
  const uint64_t huge = UINT64_MAX - 3;
  overwrite(path_, 144, &huge, 8);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk: header counts"));
}

TEST_F(CorruptShard, OffsetsOutOfOrder) {
  const uint64_t bad = 1u << 20;
  overwrite(path_, 256 + 8 * 2, &bad, 8);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk: offsets[2]"));
}

TEST_F(CorruptShard, TokenIdAtOrAboveTheVocabulary) {
  const uint64_t examples = 9;
  const uint32_t bad = 1000;
  overwrite(path_, 256 + 8 * (examples + 1) + 4 * 2, &bad, 4);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk: token 2 has id 1000, not below the vocabulary size 1000"));
}

TEST_F(CorruptShard, NonZeroReservedBytes) {
  overwrite(path_, 200, "z", 1);
  EXPECT_THAT(open_error(), HasSubstr("reserved header bytes"));
}

TEST_F(CorruptShard, MissingFile) {
  fs::remove(path_);
  EXPECT_THAT(open_error(), HasSubstr("bad.fltk"));
}

}  // namespace
}  // namespace flotilla::data
