#include "flotilla/text/hf_pretokenize.hpp"

#include "flotilla/text/unicode_classes.hpp"

namespace flotilla::text {
namespace {

// The regex texts exactly as they stand in tokenizer.json (after JSON unescaping).
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// One character of the text: where it starts, how long it is, its code point and class.
struct Char {
  char32_t cp = 0;
  uint32_t len = 0;  // 0: past the end of the text
  CharClass cls = CharClass::kOther;
};

// Walks the text by code points. All positions are byte offsets.
class Scanner {
 public:
  explicit Scanner(std::string_view text) : text_(text) {}

  size_t size() const { return text_.size(); }

  Char at(size_t pos) const {
    if (pos >= text_.size()) return {};
    const auto c0 = static_cast<unsigned char>(text_[pos]);
    if (c0 < 0x80) return {c0, 1, unicode_detail::ascii_class(c0)};
    const DecodedChar d = decode_utf8(text_, pos);
    return {d.cp, d.len, char_class_slow(d.cp)};
  }

  // End of the maximal run of characters of class `cls` starting at `pos`.
  size_t run_end(size_t pos, CharClass cls) const {
    while (pos < text_.size()) {
      const Char c = at(pos);
      if (c.cls != cls) break;
      pos += c.len;
    }
    return pos;
  }

 private:
  std::string_view text_;
};

bool is_cr_or_lf(char32_t cp) { return cp == '\r' || cp == '\n'; }

// Length in bytes of the contraction ('s 't 're 've 'm 'll 'd) at `pos`, 0 if none.
// With `ignore_case` the letters match in any case, as Oniguruma's (?i:...) does under
// Unicode case folding: that also lets U+017F LATIN SMALL LETTER LONG S stand for s.
size_t contraction_length(const Scanner& s, size_t pos, bool ignore_case) {
  const Char quote = s.at(pos);
  if (quote.cp != '\'') return 0;
  const Char c1 = s.at(pos + 1);
  if (c1.len == 0) return 0;
  auto fold = [&](char32_t cp) -> char32_t {
    if (!ignore_case) return cp;
    if (cp >= 'A' && cp <= 'Z') return cp - 'A' + 'a';
    if (cp == 0x017F) return 's';
    return cp;
  };
  const char32_t a = fold(c1.cp);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 1 + c1.len;
  const Char c2 = s.at(pos + 1 + c1.len);
  if (c2.len == 0) return 0;
  const char32_t b = fold(c2.cp);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
    return 1 + c1.len + c2.len;
  }
  return 0;
}

// The whitespace alternatives shared by all three patterns, at a whitespace character:
//   \s+(?!\S)   a run of whitespace, less its last character when something follows
//   \s+         otherwise (a single whitespace character before a non-space)
// `with_newline_rule` adds, before those, Llama 3's \s*[\r\n]+ (a run up to and including
// its last CR or LF).
size_t whitespace_end(const Scanner& s, size_t pos, bool with_newline_rule) {
  size_t end = pos;
  size_t last_char_start = pos;
  size_t after_last_newline = 0;  // 0: no CR/LF in the run (a run never ends at 0)
  while (end < s.size()) {
    const Char c = s.at(end);
    if (c.cls != CharClass::kSpace) break;
    last_char_start = end;
    end += c.len;
    if (is_cr_or_lf(c.cp)) after_last_newline = end;
  }
  if (with_newline_rule && after_last_newline != 0) return after_last_newline;
  if (end == s.size()) return end;
  if (last_char_start > pos) return last_char_start;  // the run held 2+ characters
  return end;
}

// Length of the GPT-2 match at `pos` (pos < size).
size_t gpt2_match_end(const Scanner& s, size_t pos) {
  if (const size_t n = contraction_length(s, pos, /*ignore_case=*/false)) return pos + n;
  Char c = s.at(pos);
  size_t start = pos;
  if (c.cp == ' ') {
    // " ?X+" for X in letters, numbers, others: the optional space binds to a following run.
    const Char next = s.at(pos + 1);
    if (next.len != 0 && next.cls != CharClass::kSpace) {
      start = pos + 1;
      c = next;
    }
  }
  if (c.cls != CharClass::kSpace) return s.run_end(start, c.cls);
  return whitespace_end(s, pos, /*with_newline_rule=*/false);
}

// Length of the Llama 3 / Qwen2 match at `pos` (pos < size).
size_t llama3_match_end(const Scanner& s, size_t pos, size_t max_digits) {
  if (const size_t n = contraction_length(s, pos, /*ignore_case=*/true)) return pos + n;
  const Char c = s.at(pos);
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (c.cls == CharClass::kLetter) return s.run_end(pos, CharClass::kLetter);
  if (c.cls != CharClass::kNumber && !is_cr_or_lf(c.cp)) {
    const Char next = s.at(pos + c.len);
    if (next.cls == CharClass::kLetter && next.len != 0) {
      return s.run_end(pos + c.len, CharClass::kLetter);
    }
  }
  // \p{N}{1,3}
  if (c.cls == CharClass::kNumber) {
    size_t end = pos;
    for (size_t k = 0; k < max_digits; ++k) {
      const Char d = s.at(end);
      if (d.len == 0 || d.cls != CharClass::kNumber) break;
      end += d.len;
    }
    return end;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  size_t other_start = std::string_view::npos;
  if (c.cls == CharClass::kOther) {
    other_start = pos;
  } else if (c.cp == ' ') {
    const Char next = s.at(pos + 1);
    if (next.len != 0 && next.cls == CharClass::kOther) other_start = pos + 1;
  }
  if (other_start != std::string_view::npos) {
    size_t end = s.run_end(other_start, CharClass::kOther);
    while (end < s.size() && (s.at(end).cp == '\r' || s.at(end).cp == '\n')) ++end;
    return end;
  }
  // \s*[\r\n]+ | \s+(?!\S) | \s+
  return whitespace_end(s, pos, /*with_newline_rule=*/true);
}

}  // namespace

std::optional<SplitPattern> recognize_split_pattern(std::string_view regex) {
  if (regex == kGpt2Regex) return SplitPattern::kGpt2;
  if (regex == kLlama3Regex) return SplitPattern::kLlama3;
  if (regex == kQwen2Regex) return SplitPattern::kQwen2;
  return std::nullopt;
}

const char* split_pattern_name(SplitPattern pattern) {
  switch (pattern) {
    case SplitPattern::kGpt2: return "gpt2";
    case SplitPattern::kLlama3: return "llama3";
    case SplitPattern::kQwen2: return "qwen2";
  }
  return "?";
}

void split_with_pattern(SplitPattern pattern, std::string_view text,
                        std::vector<std::string_view>& pieces) {
  const Scanner s(text);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = 0;
    switch (pattern) {
      case SplitPattern::kGpt2: end = gpt2_match_end(s, pos); break;
      case SplitPattern::kLlama3: end = llama3_match_end(s, pos, 3); break;
      case SplitPattern::kQwen2: end = llama3_match_end(s, pos, 1); break;
    }
    if (end <= pos) end = pos + s.at(pos).len;  // cannot happen; never loop forever
    pieces.push_back(text.substr(pos, end - pos));
    pos = end;
  }
}

}  // namespace flotilla::text
