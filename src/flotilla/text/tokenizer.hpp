// Tokenizer: text <-> token ids. One abstract interface so the model, trainer and
// generator never care which tokenizer a model brought. Today there is one
// implementation, the byte tokenizer (byte_tokenizer.hpp); tokenizer.json BPE and
// SentencePiece .model files arrive with the data pipeline.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flotilla::text {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Plain encoding: no BOS/EOS added (the dataset and chat templates place those).
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Concatenated text of the ids; special tokens (BOS, EOS, PAD) are skipped.
  virtual std::string decode(std::span<const int32_t> ids) const = 0;

  // Ids are in [0, vocab_size()). A model's embedding may have more rows than this
  // (padded vocabularies): a sampler must keep its draws below vocab_size().
  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  // -1 when the tokenizer has no padding token.
  virtual int32_t pad_id() const { return -1; }
  virtual bool is_special(int32_t id) const = 0;

  // The bytes one token contributes to the output, for streaming generation; empty for
  // special tokens, so concatenating the pieces of ids equals decode(ids). A piece may
  // be part of a UTF-8 code point (byte tokens, BPE byte fallback): a caller printing
  // pieces as they come must buffer incomplete sequences — see Utf8Streamer.
  virtual std::string token_to_piece(int32_t id) const = 0;

  // Short identifier for logs, e.g. "bytes".
  virtual std::string name() const = 0;

  // A stable hex digest of everything that decides encode() (vocabulary, merges,
  // normalizer, added tokens, ...): token data prepared with one tokenizer records it, and
  // training with a tokenizer of another fingerprint is an error.
  virtual std::string fingerprint() const = 0;

  // Writes this tokenizer's files into `dir` (which must exist) so that
  // load_for_model(dir) gives the same tokenizer back.
  virtual void save(const std::filesystem::path& dir) const = 0;

  // The tokenizer of a model directory:
  //   flotilla_tokenizer.json {"type": "bytes"}   -> ByteTokenizer (this file wins if present)
  //   tokenizer.json / tokenizer.model            -> InputError: not supported yet
  //   no tokenizer file at all                    -> ByteTokenizer
  // InputError naming the file for anything unreadable or unknown.
  static std::unique_ptr<Tokenizer> load_for_model(const std::filesystem::path& model_dir);
};

// File name of flotilla's own tokenizer description inside a model directory.
inline constexpr const char* kFlotillaTokenizerFile = "flotilla_tokenizer.json";

}  // namespace flotilla::text
