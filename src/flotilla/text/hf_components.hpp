// The parts of a tokenizer.json pipeline other than the BPE model, as plain values:
// normalizer steps, pre-tokenizer steps, decoder steps, and the added-token matcher.
// hf_tokenizer.cpp reads them from JSON and runs them; nothing here knows JSON.
//
// Vocabulary: a *section* is a stretch of text between added tokens; a *piece* is what the
// pre-tokenizer cuts a section into, and what the BPE model encodes.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "flotilla/text/hf_pretokenize.hpp"

namespace flotilla::text::hf {

// ---- GPT-2's byte-to-unicode alphabet -------------------------------------------------
// Byte-level vocabularies spell each byte as one printable code point: 0x21..0x7E,
// 0xA1..0xAC and 0xAE..0xFF as themselves, the other 68 bytes as U+0100.. in order.
char32_t byte_to_alphabet(uint8_t byte);
// The byte a code point of the alphabet stands for; -1 if it is not in the alphabet.
int alphabet_to_byte(char32_t cp);
// A token's raw bytes; nullopt if any of its characters is outside the alphabet.
std::optional<std::string> alphabet_to_bytes(std::string_view token);
std::string bytes_to_alphabet(std::string_view bytes);

// ---- normalizer -----------------------------------------------------------------------
struct PrependNormalizer {
  std::string prepend;  // added in front of non-empty text
};
struct ReplaceNormalizer {
  std::string pattern;  // a literal string (Regex patterns are refused by the loader)
  std::string content;
};
struct NfcNormalizer {};  // Unicode normalization form C (unicode_nfc.hpp)
using NormalizerStep = std::variant<PrependNormalizer, ReplaceNormalizer, NfcNormalizer>;

std::string normalize(std::span<const NormalizerStep> steps, std::string_view text);

// ---- pre-tokenizer --------------------------------------------------------------------
struct SplitPreTokenizer {
  SplitPattern pattern;  // behaviour Isolated, invert false
};
struct ByteLevelPreTokenizer {
  bool add_prefix_space = false;  // " " in front of each section not starting with one
  bool use_regex = true;          // split with the GPT-2 pattern
};
enum class PrependScheme { kAlways, kFirst, kNever };
struct MetaspacePreTokenizer {
  std::string replacement = "\xE2\x96\x81";  // "▁"
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = false;  // cut before every replacement character
};
using PreTokenizerStep = std::variant<SplitPreTokenizer, ByteLevelPreTokenizer, MetaspacePreTokenizer>;

// Scratch space for pre_tokenize: pieces are views into the section or into `owned`.
struct PieceBuffers {
  std::deque<std::string> owned;
  std::vector<std::string_view> pieces;
  std::vector<std::string_view> next;
};

// Cuts one section into buffers.pieces. `at_text_start`: the section begins at byte 0 of
// the caller's text (Metaspace's prepend_scheme "first" prepends only there).
void pre_tokenize(std::span<const PreTokenizerStep> steps, std::string_view section,
                  bool at_text_start, PieceBuffers& buffers);

// ---- decoder --------------------------------------------------------------------------
struct ByteLevelDecoder {};
struct ReplaceDecoder {
  std::string pattern;
  std::string content;
};
struct ByteFallbackDecoder {};
struct FuseDecoder {};
struct StripDecoder {
  std::string content;  // one character
  size_t start = 0;     // at most this many leading `content` characters removed
  size_t stop = 0;      // and trailing ones
};
struct MetaspaceDecoder {
  std::string replacement = "\xE2\x96\x81";
  bool strip_first = true;  // prepend_scheme is not "never": the first token loses its ▁
};
using DecoderStep = std::variant<ByteLevelDecoder, ReplaceDecoder, ByteFallbackDecoder,
                                 FuseDecoder, StripDecoder, MetaspaceDecoder>;

struct DecodeToken {
  std::string text;    // as tokenizer.json spells the token
  bool added = false;  // from added_tokens: ByteLevel passes it through unmapped
};

// Runs the chain over the tokens and joins the result. `whole_sequence` false: the tokens
// are a fragment (token_to_piece), so steps that act on the start of the whole sequence —
// a Strip after the tokens were fused, Metaspace's first-token rule — are left out.
std::string run_decoder(std::span<const DecoderStep> steps, std::vector<DecodeToken> tokens,
                        bool whole_sequence);

// ---- added tokens ---------------------------------------------------------------------
struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool single_word = false;  // only where no letter, digit or '_' touches it
  bool lstrip = false;       // swallows the whitespace before it
  bool rstrip = false;       // and after it
  bool normalized = false;   // matched in normalized text (else in the raw text)
};

// A stretch of text: plain text (token == -1) or one added token (its index).
struct Segment {
  size_t begin;
  size_t end;
  int32_t token;
};

// Finds added tokens in text: leftmost match first, the longest at that position; a
// single_word match touching a word character is skipped (searching on after it), as
// Hugging Face's non-overlapping search does.
class AddedTokenMatcher {
 public:
  struct Entry {
    std::string pattern;  // what the token looks like in the text searched
    AddedToken token;
    int32_t index;        // the caller's index of the token: Segment::token
  };

  AddedTokenMatcher() = default;
  // Entries with an empty pattern are ignored.
  explicit AddedTokenMatcher(std::vector<Entry> entries);

  bool empty() const { return nodes_.size() <= 1; }
  // Cuts text into segments, in order (empty text segments are left out).
  void split(std::string_view text, std::vector<Segment>& segments) const;

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;  // (byte, node index)
    int32_t entry = -1;                                  // index into entries_, -1: none
  };
  // Entry index of the longest pattern starting at pos (-1: none); its end in `end`.
  int32_t longest_match_at(std::string_view text, size_t pos, size_t& end) const;

  std::vector<Node> nodes_{1};
  std::vector<Entry> entries_;
  bool first_byte_[256] = {};
};

}  // namespace flotilla::text::hf
