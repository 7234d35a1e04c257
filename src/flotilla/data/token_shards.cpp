#include "flotilla/data/token_shards.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>

#include "flotilla/base/error.hpp"

namespace flotilla::data {
namespace {

constexpr const char* kTokenShardsComponent = "data/shards";

// Header layout (see token_shards.hpp).
constexpr size_t kVersionAt = 8;
constexpr size_t kHeaderBytesAt = 12;
constexpr size_t kFingerprintAt = 16;
constexpr size_t kExamplesAt = 144;
constexpr size_t kTokensAt = 152;
constexpr size_t kVocabAt = 160;
constexpr size_t kMaskBitsAt = 164;
constexpr size_t kReservedAt = 168;

template <class T>
T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <class T>
void store(std::byte* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

bool printable_ascii(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c < 0x7F; });
}

uint64_t mask_bytes(uint64_t tokens) { return (tokens + 7) / 8; }

// Size of a shard of E examples and N tokens; false when it overflows 64 bits.
bool shard_bytes(uint64_t examples, uint64_t tokens, uint64_t* out) {
  constexpr uint64_t kMax = UINT64_MAX / 16;
  if (examples >= kMax || tokens >= kMax) return false;
  *out = kShardHeaderBytes + 8 * (examples + 1) + 4 * tokens + mask_bytes(tokens);
  return true;
}

}  // namespace

size_t LossMaskView::count() const {
  size_t n = 0;
  for (size_t i = 0; i < size_; ++i) n += (*this)[i];
  return n;
}

void LossMaskView::unpack(std::span<uint8_t> out) const {
  if (out.size() != size_) {
    throw Error(kTokenShardsComponent, fmt::format("LossMaskView::unpack: {} outputs for {} tokens", out.size(), size_));
  }
  for (size_t i = 0; i < size_; ++i) out[i] = (*this)[i] ? 1 : 0;
}

// ---- ShardWriter ----------------------------------------------------------------------

ShardWriter::ShardWriter(std::string fingerprint, uint32_t vocab_size)
    : fingerprint_(std::move(fingerprint)), vocab_size_(vocab_size) {
  if (fingerprint_.size() > kShardFingerprintBytes || fingerprint_.empty() || !printable_ascii(fingerprint_)) {
    throw InputError(kTokenShardsComponent, fmt::format("tokenizer fingerprint {:?}: a shard stores 1 to {} printable "
                                             "ASCII characters",
                                             fingerprint_, kShardFingerprintBytes));
  }
}

void ShardWriter::add(std::span<const int32_t> tokens, std::span<const uint8_t> mask) {
  if (tokens.size() != mask.size()) {
    throw Error(kTokenShardsComponent, fmt::format("ShardWriter::add: {} tokens but {} mask entries", tokens.size(), mask.size()));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= vocab_size_) {
      throw Error(kTokenShardsComponent, fmt::format("ShardWriter::add: token id {} outside [0, {})", tokens[i], vocab_size_));
    }
    const uint64_t t = tokens_.size();
    if (t % 8 == 0) mask_bits_.push_back(0);
    if (mask[i]) mask_bits_.back() |= static_cast<uint8_t>(1u << (t % 8));
    tokens_.push_back(static_cast<uint32_t>(tokens[i]));
  }
  offsets_.push_back(tokens_.size());
}

uint64_t ShardWriter::file_bytes() const {
  uint64_t bytes = 0;
  shard_bytes(num_examples(), num_tokens(), &bytes);
  return bytes;
}

uint64_t ShardWriter::write(const std::filesystem::path& path) const {
  std::array<std::byte, kShardHeaderBytes> header{};
  std::memcpy(header.data(), kShardMagic.data(), kShardMagic.size());
  store<uint32_t>(header.data() + kVersionAt, kShardVersion);
  store<uint32_t>(header.data() + kHeaderBytesAt, static_cast<uint32_t>(kShardHeaderBytes));
  std::memcpy(header.data() + kFingerprintAt, fingerprint_.data(), fingerprint_.size());
  store<uint64_t>(header.data() + kExamplesAt, num_examples());
  store<uint64_t>(header.data() + kTokensAt, num_tokens());
  store<uint32_t>(header.data() + kVocabAt, vocab_size_);
  store<uint32_t>(header.data() + kMaskBitsAt, 1);
  AtomicFileWriter out(path);
  out.write(header);
  out.write(std::as_bytes(std::span(offsets_)));
  out.write(std::as_bytes(std::span(tokens_)));
  out.write(std::as_bytes(std::span(mask_bits_)));
  out.commit();
  return file_bytes();
}

// ---- ShardReader ----------------------------------------------------------------------

ShardReader::ShardReader(const std::filesystem::path& path) : file_(path) {
  const auto fail = [&](std::string_view what) {
    throw InputError(kTokenShardsComponent, fmt::format("{}: {}", path.string(), what));
  };
  const std::span<const std::byte> bytes = file_.bytes();
  if (bytes.size() < kShardHeaderBytes) {
    fail(fmt::format("{} bytes is shorter than the {}-byte shard header (truncated, or not a token shard)",
                     bytes.size(), kShardHeaderBytes));
  }
  const std::byte* h = bytes.data();
  if (std::memcmp(h, kShardMagic.data(), kShardMagic.size()) != 0) {
    fail("not a flotilla token shard (bad magic; expected \"FLTKSHRD\")");
  }
  const auto version = load<uint32_t>(h + kVersionAt);
  if (version != kShardVersion) {
    fail(fmt::format("shard format version {}; this flotilla reads version {}", version, kShardVersion));
  }
  const auto header_bytes = load<uint32_t>(h + kHeaderBytesAt);
  if (header_bytes != kShardHeaderBytes) {
    fail(fmt::format("header size {} (expected {})", header_bytes, kShardHeaderBytes));
  }
  const char* fp = reinterpret_cast<const char*>(h + kFingerprintAt);
  fingerprint_.assign(fp, strnlen(fp, kShardFingerprintBytes));
  for (size_t i = fingerprint_.size(); i < kShardFingerprintBytes; ++i) {
    if (fp[i] != '\0') fail("tokenizer fingerprint field is not NUL-padded (corrupt header)");
  }
  if (fingerprint_.empty() || !printable_ascii(fingerprint_)) {
    fail("tokenizer fingerprint is empty or not printable ASCII (corrupt header)");
  }
  const auto examples = load<uint64_t>(h + kExamplesAt);
  num_tokens_ = load<uint64_t>(h + kTokensAt);
  vocab_size_ = load<uint32_t>(h + kVocabAt);
  if (load<uint32_t>(h + kMaskBitsAt) != 1) fail("mask_bits_per_token is not 1 (corrupt header)");
  for (size_t i = kReservedAt; i < kShardHeaderBytes; ++i) {
    if (h[i] != std::byte{0}) fail("reserved header bytes are not zero (corrupt header)");
  }
  if (vocab_size_ == 0) fail("vocab_size is 0 (corrupt header)");
  uint64_t expected = 0;
  if (!shard_bytes(examples, num_tokens_, &expected)) {
    fail(fmt::format("header counts {} examples, {} tokens: impossible (corrupt header)", examples, num_tokens_));
  }
  if (bytes.size() != expected) {
    fail(fmt::format("{} bytes, but its header ({} examples, {} tokens) needs exactly {}{}", bytes.size(),
                     examples, num_tokens_, expected, bytes.size() < expected ? " (truncated)" : ""));
  }
  num_examples_ = static_cast<size_t>(examples);
  offsets_ = reinterpret_cast<const uint64_t*>(h + kShardHeaderBytes);
  tokens_ = reinterpret_cast<const uint32_t*>(h + kShardHeaderBytes + 8 * (examples + 1));
  mask_bits_ = reinterpret_cast<const uint8_t*>(tokens_ + num_tokens_);
  if (offsets_[0] != 0) fail("offsets[0] is not 0 (corrupt offsets)");
  for (size_t i = 0; i < num_examples_; ++i) {
    if (offsets_[i + 1] < offsets_[i] || offsets_[i + 1] > num_tokens_) {
      fail(fmt::format("offsets[{}] = {} after offsets[{}] = {} with {} tokens (corrupt offsets)", i + 1,
                       offsets_[i + 1], i, offsets_[i], num_tokens_));
    }
  }
  if (offsets_[num_examples_] != num_tokens_) {
    fail(fmt::format("the last offset is {}, not the token count {} (corrupt offsets)", offsets_[num_examples_],
                     num_tokens_));
  }
  uint32_t max_id = 0;
  for (uint64_t t = 0; t < num_tokens_; ++t) max_id = std::max(max_id, tokens_[t]);
  if (num_tokens_ > 0 && max_id >= vocab_size_) {
    const uint32_t* bad = std::find_if(tokens_, tokens_ + num_tokens_, [&](uint32_t id) { return id >= vocab_size_; });
    fail(fmt::format("token {} has id {}, not below the vocabulary size {} (corrupt tokens)", bad - tokens_, *bad,
                     vocab_size_));
  }
}

ExampleView ShardReader::example(size_t i) const {
  if (i >= num_examples_) {
    throw Error(kTokenShardsComponent, fmt::format("{}: example {} of {}", path().string(), i, num_examples_));
  }
  const uint64_t begin = offsets_[i];
  const uint64_t n = offsets_[i + 1] - begin;
  return {std::span<const uint32_t>(tokens_ + begin, n), LossMaskView(mask_bits_, begin, n)};
}

}  // namespace flotilla::data
