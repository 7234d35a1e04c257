// Token shards: prepared examples (token ids and loss masks) in a compact binary file that
// training reads through mmap, with no parsing and no tokenizer.
//
// Vocabulary: an *example* is one sequence of token ids with a loss mask; a *shard* is one
// file holding many whole examples (an example never spans shards); a *split* (train,
// valid, test) is one or more shards, listed in the folder's index.json.
//
// Shard file, little-endian, every field at its natural alignment:
//
//   offset  bytes      field
//   0       8          magic "FLTKSHRD"
//   8       4          version (uint32) = 1
//   12      4          header_bytes (uint32) = 256
//   16      128        tokenizer fingerprint, ASCII, NUL-padded (a 128-character one fills it)
//   144     8          num_examples E (uint64)
//   152     8          num_tokens N (uint64)
//   160     4          vocab_size (uint32): every token id is below it
//   164     4          mask_bits_per_token (uint32) = 1
//   168     88         reserved, zero
//   256     8 (E+1)    offsets (uint64): example i is tokens [offsets[i], offsets[i+1]);
//                      offsets[0] = 0, non-decreasing, offsets[E] = N
//   ...     4 N        token ids (uint32)
//   ...     ceil(N/8)  loss mask, 1 bit per token: token t's bit is bit (t % 8) of byte t / 8
//                      (t counts from the first token of the shard)
//   The file ends there: its size is exactly 256 + 8 (E+1) + 4 N + ceil(N/8).
//
// Why 1 bit per token: the mask is a boolean per token and rides along with 4-byte ids; a
// bit adds 3% to the file, a byte 25%. Reading a bit costs a shift and an AND, and training
// reads a few thousand per step, so the smaller file (and page cache) wins.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/file.hpp"

namespace flotilla::data {

static_assert(std::endian::native == std::endian::little,
              "token shards are little-endian and read in place: add byte swapping for this host");

inline constexpr std::string_view kShardMagic = "FLTKSHRD";
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 256;
inline constexpr size_t kShardFingerprintBytes = 128;

// One example's loss mask: a view of `size` bits starting at bit `first_bit` of `bits`.
class LossMaskView {
 public:
  LossMaskView() = default;
  LossMaskView(const uint8_t* bits, uint64_t first_bit, size_t size)
      : bits_(bits), first_bit_(first_bit), size_(size) {}
  size_t size() const { return size_; }
  bool operator[](size_t i) const {
    const uint64_t b = first_bit_ + i;
    return (bits_[b >> 3] >> (b & 7)) & 1u;
  }
  // Number of tokens with mask 1.
  size_t count() const;
  // out[i] = mask[i] (0 or 1); out.size() must equal size().
  void unpack(std::span<uint8_t> out) const;

 private:
  const uint8_t* bits_ = nullptr;
  uint64_t first_bit_ = 0;
  size_t size_ = 0;
};

struct ExampleView {
  std::span<const uint32_t> tokens;  // (n,)
  LossMaskView mask;                 // (n,) mask[i]: predicting tokens[i] is in the loss
};

// Builds one shard in memory and writes it atomically (temp file, fsync, rename).
class ShardWriter {
 public:
  // InputError if the fingerprint is longer than 128 bytes or not printable ASCII.
  ShardWriter(std::string fingerprint, uint32_t vocab_size);
  // tokens: (n,), mask: (n,) 0/1. Error (a caller bug) for an id >= vocab_size or a length mismatch.
  void add(std::span<const int32_t> tokens, std::span<const uint8_t> mask);
  size_t num_examples() const { return offsets_.size() - 1; }
  uint64_t num_tokens() const { return tokens_.size(); }
  // Bytes the file will have.
  uint64_t file_bytes() const;
  // Writes the shard to `path`; returns its size in bytes.
  uint64_t write(const std::filesystem::path& path) const;

 private:
  std::string fingerprint_;
  uint32_t vocab_size_;
  std::vector<uint64_t> offsets_{0};  // (E+1,)
  std::vector<uint32_t> tokens_;      // (N,)
  std::vector<uint8_t> mask_bits_;    // (ceil(N/8),)
};

// One shard, memory-mapped and validated on open: header fields, exact file size, offsets,
// and every token id below vocab_size (one pass over the tokens, so a bad id is an error
// here instead of an out-of-bounds embedding row later). Anything wrong: InputError naming
// the file.
class ShardReader {
 public:
  explicit ShardReader(const std::filesystem::path& path);
  const std::filesystem::path& path() const { return file_.path(); }
  const std::string& fingerprint() const { return fingerprint_; }
  uint32_t vocab_size() const { return vocab_size_; }
  size_t num_examples() const { return num_examples_; }
  uint64_t num_tokens() const { return num_tokens_; }
  uint64_t file_bytes() const { return file_.size(); }
  // The whole file as mapped, for its checksum.
  std::span<const std::byte> file_contents() const { return file_.bytes(); }
  // i < num_examples(), else flotilla::Error (a caller bug).
  ExampleView example(size_t i) const;

 private:
  MappedFile file_;
  std::string fingerprint_;
  uint32_t vocab_size_ = 0;
  size_t num_examples_ = 0;
  uint64_t num_tokens_ = 0;
  const uint64_t* offsets_ = nullptr;  // (E+1,)
  const uint32_t* tokens_ = nullptr;   // (N,)
  const uint8_t* mask_bits_ = nullptr;  // (ceil(N/8),)
};

}  // namespace flotilla::data
