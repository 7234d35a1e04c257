// Tokenizer: text <-> token ids. One abstract interface so the model, trainer and
// generator never care which tokenizer a model brought. Implementations: the byte
// tokenizer (byte_tokenizer.hpp), SentencePiece tokenizer.model files
// (sentencepiece_tokenizer.hpp) and Hugging Face tokenizer.json (hf_tokenizer.hpp).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
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

  // Whether a caller wrapping a document (pretraining text, a prompt) puts BOS before it
  // and EOS after it. The model's tokenizer_config.json (add_bos_token, add_eos_token)
  // decides where it says; otherwise BOS when there is one, EOS never (Llama's default).
  virtual bool add_bos() const { return bos_id() >= 0; }
  virtual bool add_eos() const { return false; }

  // The bytes one token contributes to the output, for streaming generation; empty for
  // special tokens, so concatenating the pieces of ids equals decode(ids) — except that
  // when decode_strips_leading_space(), decode drops one space from the start of the
  // text. A piece may be part of a UTF-8 code point (byte tokens, BPE byte fallback): a
  // caller printing pieces as they come must buffer incomplete sequences — see
  // Utf8Streamer.
  virtual std::string token_to_piece(int32_t id) const = 0;

  // True for tokenizers whose encoder prepends a space to the text (SentencePiece's
  // add_dummy_prefix, the Metaspace/Prepend "▁" of Llama's tokenizer.json): their decoder
  // removes that one space again at the start of a text. token_to_piece keeps it, which
  // is what streaming a continuation after a prompt needs (" world" after "Hello").
  virtual bool decode_strips_leading_space() const { return false; }

  // Short identifier for logs, e.g. "bytes".
  virtual std::string name() const = 0;

  // A stable hex digest of everything that decides encode() (vocabulary, merges,
  // normalizer, added tokens, ...): token data prepared with one tokenizer records it, and
  // training with a tokenizer of another fingerprint is an error.
  virtual std::string fingerprint() const = 0;

  // Writes this tokenizer's files into `dir` (which must exist) so that
  // load_for_model(dir) gives the same tokenizer back.
  virtual void save(const std::filesystem::path& dir) const = 0;

  // The tokenizer of a model directory, first match wins:
  //   flotilla_tokenizer.json {"type": "bytes"}   -> ByteTokenizer
  //   tokenizer.json                              -> Hugging Face tokenizer (preferred over
  //                                                  tokenizer.model when both are there, as
  //                                                  transformers' fast tokenizer does)
  //   tokenizer.model                             -> SentencePieceTokenizer
  //   no tokenizer file at all                    -> ByteTokenizer
  // tokenizer_config.json, when present, sets add_bos() / add_eos().
  // InputError naming the file for anything unreadable or unknown.
  static std::unique_ptr<Tokenizer> load_for_model(const std::filesystem::path& model_dir);
};

// File names inside a model directory.
inline constexpr const char* kFlotillaTokenizerFile = "flotilla_tokenizer.json";
inline constexpr const char* kTokenizerConfigFile = "tokenizer_config.json";

// What a model's tokenizer_config.json says about wrapping documents; absent or null keys
// stay empty (the tokenizer's own default applies).
struct TokenizerConfig {
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
};

// Reads model_dir/tokenizer_config.json; all empty when there is no such file. InputError
// naming the file when it is not JSON or a key has a type other than bool or null.
TokenizerConfig read_tokenizer_config(const std::filesystem::path& model_dir);

}  // namespace flotilla::text
