// SentencePiece tokenizer: a tokenizer.model file (a serialized SentencePiece ModelProto,
// as Llama 1/2, Mistral and many others ship it), run by Google's own library
// (Debian's libsentencepiece), so ids are those of the Python bindings and of
// transformers' slow LlamaTokenizer, bit for bit.
//
//   encode       EncodeAsIds: normalizer + BPE/unigram of the model, byte fallback if the
//                model has it; no BOS/EOS (see Tokenizer::add_bos / add_eos).
//   decode       SentencePiece's decoder: control ids (BOS, EOS, PAD, ...) vanish, byte
//                pieces are joined into UTF-8 (an invalid sequence becomes U+FFFD), the
//                unknown id becomes the model's unk surface (" ⁇ " by default), and one
//                leading "▁" of the text is dropped (the dummy prefix).
//   token_to_piece  "▁" -> " ", <0xNN> -> the raw byte NN, control -> "", unknown -> the
//                unk surface. The first piece keeps its leading space: for the ids that
//                encode() gives, decode(ids) is the concatenation of the pieces with one
//                leading space removed when decode_strips_leading_space().
//   is_special   SentencePiece control pieces only (<s>, </s>, a pad piece, declared
//                control symbols). The unknown piece is not special: it decodes to text.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "flotilla/text/tokenizer.hpp"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace flotilla::text {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Loads `model_file`. InputError naming the file when it cannot be read or is not a
  // SentencePiece model (with SentencePiece's own message). `config` overrides add_bos()
  // and add_eos() (a model directory's tokenizer_config.json).
  explicit SentencePieceTokenizer(const std::filesystem::path& model_file,
                                  const TokenizerConfig& config = {});
  ~SentencePieceTokenizer() override;
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  std::vector<int32_t> encode(std::string_view text) const override;
  // An id outside [0, vocab_size()) is a caller bug: flotilla::Error.
  std::string decode(std::span<const int32_t> ids) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  // -1 where the model disables the piece (Llama: pad_id -1).
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  int32_t pad_id() const override { return pad_id_; }
  int32_t unk_id() const { return unk_id_; }
  bool is_special(int32_t id) const override;
  bool add_bos() const override { return add_bos_; }
  bool add_eos() const override { return add_eos_; }
  // Error for an id outside [0, vocab_size()).
  std::string token_to_piece(int32_t id) const override;
  bool decode_strips_leading_space() const override { return strips_leading_space_; }
  std::string name() const override { return "sentencepiece"; }
  // FNV-1a 64 of the model file's bytes, 16 hex digits: the file holds the whole
  // encoder (pieces, scores, normalizer rules, trainer flags such as byte_fallback).
  std::string fingerprint() const override { return fingerprint_; }
  // Writes dir/tokenizer.model (the loaded bytes, unchanged) and sets add_bos_token /
  // add_eos_token in dir/tokenizer_config.json, keeping any other keys already there.
  void save(const std::filesystem::path& dir) const override;

 private:
  std::filesystem::path model_file_;  // for messages
  std::string model_bytes_;           // the serialized ModelProto, as read
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  // (vocab_size) what each id contributes to decoded text, see token_to_piece
  std::vector<std::string> pieces_;
  std::vector<bool> is_control_;  // (vocab_size)
  int32_t vocab_size_ = 0;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t pad_id_ = -1;
  int32_t unk_id_ = -1;
  bool add_bos_ = false;
  bool add_eos_ = false;
  bool strips_leading_space_ = false;
  std::string fingerprint_;
};

}  // namespace flotilla::text
