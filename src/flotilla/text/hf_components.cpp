#include "flotilla/text/hf_components.hpp"

#include <array>

#include "flotilla/text/unicode_classes.hpp"
#include "flotilla/text/unicode_nfc.hpp"

namespace flotilla::text::hf {
namespace {

constexpr bool printable_byte(unsigned b) {
  return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

// The 68 bytes that the alphabet moves to U+0100.., in byte order.
constexpr std::array<uint8_t, 68> kShiftedBytes = [] {
  std::array<uint8_t, 68> shifted{};
  size_t n = 0;
  for (unsigned b = 0; b < 256; ++b) {
    if (!printable_byte(b)) shifted[n++] = static_cast<uint8_t>(b);
  }
  return shifted;
}();

constexpr std::array<char32_t, 256> kByteToAlphabet = [] {
  std::array<char32_t, 256> map{};
  char32_t next = 0x100;
  for (unsigned b = 0; b < 256; ++b) map[b] = printable_byte(b) ? b : next++;
  return map;
}();

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string replace_all(std::string_view text, std::string_view pattern, std::string_view content) {
  if (pattern.empty()) return std::string(text);
  std::string out;
  out.reserve(text.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(pattern, pos);
    if (hit == std::string_view::npos) break;
    out.append(text.substr(pos, hit - pos)).append(content);
    pos = hit + pattern.size();
  }
  out.append(text.substr(pos));
  return out;
}

// Start of the code point that ends just before `pos` (pos > 0).
size_t previous_char_start(std::string_view text, size_t pos) {
  size_t start = pos - 1;
  for (int k = 0; k < 3 && start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80; ++k) {
    --start;
  }
  // A lead byte must decode to exactly the bytes up to pos; otherwise count the last byte alone.
  return decode_utf8(text, start).len == pos - start ? start : pos - 1;
}

bool is_whitespace_at(std::string_view text, size_t pos) {
  return char_class(decode_utf8(text, pos).cp) == CharClass::kSpace;
}

bool is_word_char_at(std::string_view text, size_t pos) {
  const char32_t cp = decode_utf8(text, pos).cp;
  const CharClass cls = char_class(cp);
  return cls == CharClass::kLetter || cls == CharClass::kNumber || cp == '_';
}

// "<0xNN>" -> NN, else -1 (Hugging Face's ByteFallback decoder accepts either case).
int byte_token_value(std::string_view token) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return -1;
  int value = 0;
  for (const char c : token.substr(3, 2)) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

std::string strip_chars(std::string_view token, std::string_view content, size_t start, size_t stop) {
  if (content.empty()) return std::string(token);
  for (size_t k = 0; k < start && token.starts_with(content); ++k) token.remove_prefix(content.size());
  for (size_t k = 0; k < stop && token.ends_with(content); ++k) token.remove_suffix(content.size());
  return std::string(token);
}

}  // namespace

char32_t byte_to_alphabet(uint8_t byte) { return kByteToAlphabet[byte]; }

int alphabet_to_byte(char32_t cp) {
  if (cp < 0x100) return printable_byte(cp) ? static_cast<int>(cp) : -1;
  if (cp < 0x100 + kShiftedBytes.size()) return kShiftedBytes[cp - 0x100];
  return -1;
}

std::optional<std::string> alphabet_to_bytes(std::string_view token) {
  std::string bytes;
  bytes.reserve(token.size());
  for (size_t pos = 0; pos < token.size();) {
    const DecodedChar c = decode_utf8(token, pos);
    const int b = c.cp == unicode_detail::kReplacementChar ? -1 : alphabet_to_byte(c.cp);
    if (b < 0) return std::nullopt;
    bytes.push_back(static_cast<char>(b));
    pos += c.len;
  }
  return bytes;
}

std::string bytes_to_alphabet(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char b : bytes) append_utf8(out, byte_to_alphabet(static_cast<uint8_t>(b)));
  return out;
}

std::string normalize(std::span<const NormalizerStep> steps, std::string_view text) {
  std::string out(text);
  for (const NormalizerStep& step : steps) {
    if (const auto* prepend = std::get_if<PrependNormalizer>(&step)) {
      if (!out.empty()) out.insert(0, prepend->prepend);
    } else if (const auto* replace = std::get_if<ReplaceNormalizer>(&step)) {
      out = replace_all(out, replace->pattern, replace->content);
    } else if (std::holds_alternative<NfcNormalizer>(step)) {
      out = to_nfc(out);
    }
  }
  return out;
}

void pre_tokenize(std::span<const PreTokenizerStep> steps, std::string_view section,
                  bool at_text_start, PieceBuffers& buffers) {
  auto& pieces = buffers.pieces;
  auto& next = buffers.next;
  pieces.clear();
  buffers.owned.clear();
  if (section.empty()) return;
  pieces.push_back(section);
  for (const PreTokenizerStep& step : steps) {
    next.clear();
    if (const auto* split = std::get_if<SplitPreTokenizer>(&step)) {
      for (const std::string_view piece : pieces) split_with_pattern(split->pattern, piece, next);
    } else if (const auto* byte_level = std::get_if<ByteLevelPreTokenizer>(&step)) {
      for (std::string_view piece : pieces) {
        if (byte_level->add_prefix_space && !piece.starts_with(' ')) {
          piece = buffers.owned.emplace_back(std::string(" ").append(piece));
        }
        if (byte_level->use_regex) {
          split_with_pattern(SplitPattern::kGpt2, piece, next);
        } else {
          next.push_back(piece);
        }
      }
    } else if (const auto* meta = std::get_if<MetaspacePreTokenizer>(&step)) {
      const std::string_view rep = meta->replacement;
      for (size_t i = 0; i < pieces.size(); ++i) {
        std::string text = replace_all(pieces[i], " ", rep);
        const bool prepend =
            !text.starts_with(rep) &&
            (meta->prepend_scheme == PrependScheme::kAlways ||
             (meta->prepend_scheme == PrependScheme::kFirst && at_text_start && i == 0));
        if (prepend) text.insert(0, rep);
        const std::string_view owned = buffers.owned.emplace_back(std::move(text));
        if (!meta->split || rep.empty()) {
          next.push_back(owned);
          continue;
        }
        // Split with behaviour MergedWithNext: each replacement opens a new piece.
        size_t begin = 0;
        for (size_t hit = owned.find(rep, 1); hit != std::string_view::npos; hit = owned.find(rep, hit + rep.size())) {
          next.push_back(owned.substr(begin, hit - begin));
          begin = hit;
        }
        next.push_back(owned.substr(begin));
      }
    }
    pieces.swap(next);
  }
}

std::string run_decoder(std::span<const DecoderStep> steps, std::vector<DecodeToken> tokens,
                        bool whole_sequence) {
  bool fused = false;  // the tokens have been joined into one: what follows sees the sequence
  auto fuse = [&](std::string text) {
    tokens.clear();
    tokens.push_back({std::move(text), false});
    fused = true;
  };
  for (const DecoderStep& step : steps) {
    if (std::holds_alternative<ByteLevelDecoder>(step)) {
      std::string bytes;
      for (const DecodeToken& t : tokens) {
        std::optional<std::string> raw;
        if (!t.added) raw = alphabet_to_bytes(t.text);
        bytes += raw ? *raw : t.text;
      }
      fuse(std::move(bytes));
    } else if (const auto* replace = std::get_if<ReplaceDecoder>(&step)) {
      for (DecodeToken& t : tokens) t.text = replace_all(t.text, replace->pattern, replace->content);
    } else if (std::holds_alternative<ByteFallbackDecoder>(step)) {
      for (DecodeToken& t : tokens) {
        if (const int b = byte_token_value(t.text); b >= 0) t.text = std::string(1, static_cast<char>(b));
      }
    } else if (std::holds_alternative<FuseDecoder>(step)) {
      std::string joined;
      for (const DecodeToken& t : tokens) joined += t.text;
      fuse(std::move(joined));
    } else if (const auto* strip = std::get_if<StripDecoder>(&step)) {
      if (fused && !whole_sequence) continue;
      for (DecodeToken& t : tokens) t.text = strip_chars(t.text, strip->content, strip->start, strip->stop);
    } else if (const auto* meta = std::get_if<MetaspaceDecoder>(&step)) {
      for (size_t i = 0; i < tokens.size(); ++i) {
        const bool first = i == 0 && whole_sequence && !fused && meta->strip_first;
        tokens[i].text = replace_all(tokens[i].text, meta->replacement, first ? "" : " ");
      }
    }
  }
  std::string out;
  for (const DecodeToken& t : tokens) out += t.text;
  return out;
}

AddedTokenMatcher::AddedTokenMatcher(std::vector<Entry> entries) : entries_(std::move(entries)) {
  for (size_t e = 0; e < entries_.size(); ++e) {
    const std::string& pattern = entries_[e].pattern;
    if (pattern.empty()) continue;
    int32_t node = 0;
    for (const char ch : pattern) {
      const auto byte = static_cast<uint8_t>(ch);
      int32_t child = -1;
      for (const auto& [b, index] : nodes_[node].children) {
        if (b == byte) child = index;
      }
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_[node].children.emplace_back(byte, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    // Two tokens with the same text: the later one wins, as in a map keyed by content.
    nodes_[node].entry = static_cast<int32_t>(e);
    first_byte_[static_cast<uint8_t>(pattern[0])] = true;
  }
}

int32_t AddedTokenMatcher::longest_match_at(std::string_view text, size_t pos, size_t& end) const {
  int32_t node = 0;
  int32_t found = -1;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto byte = static_cast<uint8_t>(text[i]);
    int32_t child = -1;
    for (const auto& [b, index] : nodes_[node].children) {
      if (b == byte) {
        child = index;
        break;
      }
    }
    if (child < 0) break;
    node = child;
    if (nodes_[node].entry >= 0) {
      found = nodes_[node].entry;
      end = i + 1;
    }
  }
  return found;
}

void AddedTokenMatcher::split(std::string_view text, std::vector<Segment>& segments) const {
  size_t plain_start = 0;  // start of the text not yet emitted
  size_t pos = 0;          // where the search resumes
  while (pos < text.size() && !empty()) {
    if (!first_byte_[static_cast<uint8_t>(text[pos])]) {
      ++pos;
      continue;
    }
    size_t stop = 0;
    const int32_t e = longest_match_at(text, pos, stop);
    if (e < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = entries_[e].token;
    size_t start = pos;
    pos = stop;
    if (token.single_word) {
      const bool word_before = start > 0 && is_word_char_at(text, previous_char_start(text, start));
      const bool word_after = stop < text.size() && is_word_char_at(text, stop);
      if (word_before || word_after) continue;
    }
    if (token.lstrip) {
      while (start > plain_start) {
        const size_t prev = previous_char_start(text, start);
        if (prev < plain_start || !is_whitespace_at(text, prev)) break;
        start = prev;
      }
    }
    if (token.rstrip) {
      while (stop < text.size() && is_whitespace_at(text, stop)) stop += decode_utf8(text, stop).len;
    }
    if (start > plain_start) segments.push_back({plain_start, start, -1});
    segments.push_back({start, stop, entries_[e].index});
    plain_start = pos = stop;
  }
  if (plain_start < text.size()) segments.push_back({plain_start, text.size(), -1});
}

}  // namespace flotilla::text::hf
