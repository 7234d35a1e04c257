// The byte tokenizer: every byte of UTF-8 text is one token. No training, no files to
// ship, any text round-trips exactly. The price is long sequences (about 4x a BPE), which
// is fine for the small models trained from scratch on the sample corpus.
//
//   ids 0..255   the bytes 0x00..0xFF
//   256          <bos>
//   257          <eos>
//   258          <pad>
//   vocab_size() 259 (a model may round its vocabulary up; ids >= 259 are never produced)
#pragma once

#include "flotilla/text/tokenizer.hpp"

namespace flotilla::text {

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kBos = 256;
  static constexpr int32_t kEos = 257;
  static constexpr int32_t kPad = 258;
  static constexpr int32_t kVocabSize = 259;

  std::vector<int32_t> encode(std::string_view text) const override;
  // Skips special tokens; an id outside [0, 259) is a caller bug: flotilla::Error.
  std::string decode(std::span<const int32_t> ids) const override;
  int32_t vocab_size() const override { return kVocabSize; }
  int32_t bos_id() const override { return kBos; }
  int32_t eos_id() const override { return kEos; }
  int32_t pad_id() const override { return kPad; }
  bool is_special(int32_t id) const override { return id >= kBos && id < kVocabSize; }
  // One byte for a byte token (possibly part of a multi-byte code point), "" for a
  // special token; Error for an id outside [0, 259).
  std::string token_to_piece(int32_t id) const override;
  std::string name() const override { return "bytes"; }
  std::string fingerprint() const override { return "bytes-v1"; }
  // Writes dir/flotilla_tokenizer.json: {"type": "bytes", "vocab_size": 259, ...}.
  void save(const std::filesystem::path& dir) const override;
};

}  // namespace flotilla::text
