// HfTokenizer: a Hugging Face tokenizer.json whose model is BPE, in both kinds the
// Llama family uses:
//
//   byte-level BPE     GPT-2, Llama 3, Qwen2. pre_tokenizer ByteLevel (add_prefix_space,
//                      use_regex) and/or Sequence[Split(Regex, Isolated), ByteLevel(use_regex
//                      false)] with one of the split patterns of hf_pretokenize.hpp; decoder
//                      ByteLevel; normalizer NFC (Qwen2) or none.
//   SentencePiece BPE  Llama 2, Mistral, TinyLlama. normalizer Sequence[Prepend("▁"),
//                      Replace(" ", "▁")] or pre_tokenizer Metaspace("▁", prepend_scheme,
//                      split); BPE with byte_fallback (<0xNN> tokens), unk_token, fuse_unk;
//                      decoder Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip] or
//                      Metaspace.
//
// encode(text), as Hugging Face's encode(text, add_special_tokens=False):
//   1. added tokens (the added_tokens list) are found in the raw text, leftmost and longest
//      first (single_word, lstrip, rstrip honoured); each is its id;
//   2. the text between them is normalized, then split again on the added tokens that
//      match normalized text ("normalized": true);
//   3. the pre-tokenizer cuts the rest into pieces; the BPE model turns each into ids.
// No BOS/EOS is added: callers place them (bos_id(), eos_id(), add_bos_token()).
//
// decode(ids) runs the decoder chain over the tokens, special added tokens skipped. Where
// Hugging Face would replace invalid UTF-8 by U+FFFD (a sequence cut inside a code point),
// the bytes are returned as they are, so that decode(ids) is the concatenation of the
// pieces; streaming callers use Utf8Streamer. One exception to that rule: a decoder that
// strips the sequence's leading space (Strip after Fuse, Metaspace) does so in decode()
// only — token_to_piece() keeps each token's space, which is what a generator appending
// tokens to a prompt needs.
//
// Anything else — other model types (WordPiece, Unigram, WordLevel), other normalizers,
// pre-tokenizers, decoders, an unknown split regex — is an InputError naming the file and
// the part that is not supported.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include "flotilla/text/tokenizer.hpp"

namespace flotilla::text {

class HfTokenizer final : public Tokenizer {
 public:
  // `tokenizer_config`: tokenizer_config.json for bos_token, eos_token, pad_token,
  // add_bos_token, add_eos_token; empty path for none. Without it the BOS/EOS come from the
  // post_processor's template and well-known special tokens.
  explicit HfTokenizer(const std::filesystem::path& tokenizer_json,
                       const std::filesystem::path& tokenizer_config = {});
  ~HfTokenizer() override;
  HfTokenizer(const HfTokenizer&) = delete;
  HfTokenizer& operator=(const HfTokenizer&) = delete;

  std::vector<int32_t> encode(std::string_view text) const override;
  // Error for an id outside [0, vocab_size()); ids the file never assigned decode to "".
  std::string decode(std::span<const int32_t> ids) const override;
  int32_t vocab_size() const override;
  // -1 when the tokenizer has none (Qwen2 has no BOS).
  int32_t bos_id() const override;
  int32_t eos_id() const override;
  int32_t pad_id() const override;
  // Added tokens marked "special", and the BOS/EOS/PAD ids.
  bool is_special(int32_t id) const override;
  std::string token_to_piece(int32_t id) const override;
  // "hf-bpe-byte-level" or "hf-bpe-sentencepiece".
  std::string name() const override;
  // "hf-" + FNV-1a 64 of the tokenizer.json bytes and the BOS/EOS settings, in hex.
  std::string fingerprint() const override;
  // Copies tokenizer.json (and tokenizer_config.json when one was given) into `dir`.
  void save(const std::filesystem::path& dir) const override;

  // Whether the model expects a BOS before each sequence (tokenizer_config.json's
  // add_bos_token, else whether the post_processor template starts with a special token).
  bool add_bos_token() const;
  bool add_eos_token() const;
  // The token's text as tokenizer.json writes it; -1 / "" when absent.
  int32_t token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// model_dir/tokenizer.json, with model_dir/tokenizer_config.json when present.
// InputError naming the file when either is missing, malformed or unsupported.
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::filesystem::path& model_dir);

}  // namespace flotilla::text
