// The BPE model of a Hugging Face tokenizer.json: a vocabulary, ranked merges, and the
// merge loop that turns one pre-tokenized *piece* into token ids.
//
// Vocabulary of this file:
//   unit     what a piece is first cut into. Byte-level BPE (GPT-2, Llama 3, Qwen2): one
//            byte. SentencePiece-style BPE (Llama 2, Mistral): one UTF-8 code point.
//   key      the bytes a token stands for in units: for byte-level BPE the raw bytes
//            (tokenizer.json spells them through GPT-2's byte-to-unicode table; the
//            loader undoes that, so encode never maps text to that alphabet), otherwise
//            the token's UTF-8 text as written.
//   symbol   a token id in the working list of one piece while merges are applied.
//   rank     a merge's index in the merges list: lower ranks merge first; among equal
//            ranks the leftmost pair merges first (as Hugging Face's BPE does).
//
// Word boundaries (SentencePiece-style only): see split_words_ below.
//
// Units missing from the vocabulary become <0xNN> byte tokens when byte_fallback is on and
// all of the unit's bytes have one, else the unk token (consecutive ones fused into one
// when fuse_unk), else they are dropped — the same order of resort as Hugging Face.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace flotilla::text {

struct BpeOptions {
  bool byte_level = false;     // units are bytes (else UTF-8 code points)
  bool byte_fallback = false;  // <0xNN> tokens for units not in the vocabulary
  bool fuse_unk = false;       // consecutive unknown units give one unk token
  bool ignore_merges = false;  // a piece that is itself a token is emitted whole
  int32_t unk_id = -1;         // -1: no unk token (unknown units are dropped)
};

class BpeModel {
 public:
  // `vocab`: (key, id) pairs; `merges`: (left key, right key) in rank order. `source`
  // names the file in error messages. InputError when a merge names a key that is not in
  // the vocabulary or whose concatenation is not.
  BpeModel(std::vector<std::pair<std::string, int32_t>> vocab,
           const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options,
           std::string_view source);
  ~BpeModel();
  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of one piece (already in units: raw bytes or normalized UTF-8).
  // Thread-safe: the only shared mutable state is the piece cache, behind its locks.
  void encode_piece(std::string_view piece, std::vector<int32_t>& ids) const;

  // Id of a key, -1 if absent.
  int32_t find(std::string_view key) const;

  const BpeOptions& options() const { return options_; }
  size_t merge_count() const { return merge_count_; }

 private:
  struct MergeTable;
  struct PieceCache;

  // Merges one word (a piece, or a stretch of one between word boundaries), via the cache.
  void encode_word(std::string_view word, std::vector<int32_t>& ids) const;
  // Initial symbols of a piece: its units mapped to ids (byte fallback / unk applied).
  void initial_symbols(std::string_view piece, std::vector<int32_t>& symbols) const;
  // Applies merges in place (lowest rank, then leftmost, first).
  void merge_short(std::vector<int32_t>& symbols) const;
  void merge_long(std::vector<int32_t>& symbols) const;

  struct KeyHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, int32_t, KeyHash, std::equal_to<>> vocab_;
  std::unique_ptr<MergeTable> merges_;
  size_t merge_count_ = 0;
  BpeOptions options_;
  std::array<int32_t, 256> byte_ids_{};           // byte-level: id of each single byte, -1
  std::array<int32_t, 256> byte_fallback_ids_{};  // id of <0xNN>, -1
  std::unique_ptr<PieceCache> cache_;
  // SentencePiece-style vocabularies where no token has "▁" right after another character
  // cannot merge across such a place: a piece (often a whole sentence) is cut there into
  // words that merge independently — same result, far less work, and cacheable.
  bool split_words_ = false;
};

}  // namespace flotilla::text
