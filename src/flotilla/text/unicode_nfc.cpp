#include "flotilla/text/unicode_nfc.hpp"

#include <algorithm>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "flotilla/text/unicode_classes.hpp"

namespace flotilla::text {
namespace {

using nfc_detail::kCombiningClassCount;
using nfc_detail::kCombiningClasses;
using nfc_detail::kDecompositionCount;
using nfc_detail::kDecompositions;

// Hangul syllables decompose into jamo by arithmetic (Unicode 3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

// A byte that is not valid UTF-8 travels as this value plus the byte: above every code
// point, so it has class 0, no decomposition, and composes with nothing.
constexpr char32_t kRawByte = 0x110000;

uint8_t combining_class(char32_t cp) {
  if (cp < 0x300 || cp >= kRawByte) return 0;
  const auto* end = kCombiningClasses + kCombiningClassCount;
  const auto* it = std::upper_bound(kCombiningClasses, end, cp,
                                    [](char32_t c, const auto& r) { return c < r.first; });
  if (it == kCombiningClasses) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

const nfc_detail::Decomposition* find_decomposition(char32_t cp) {
  const auto* end = kDecompositions + kDecompositionCount;
  const auto* it = std::lower_bound(kDecompositions, end, cp, [](const auto& d, char32_t c) { return d.cp < c; });
  return it != end && it->cp == cp ? it : nullptr;
}

// Tables derived once from the generated data: pairs that compose, and the characters
// that can be the second of such a pair.
struct CompositionTables {
  std::unordered_map<uint64_t, char32_t> pairs;
  std::unordered_set<char32_t> seconds;

  CompositionTables() {
    for (size_t i = 0; i < kDecompositionCount; ++i) {
      const nfc_detail::Decomposition& d = kDecompositions[i];
      if (!d.composes || d.second == 0) continue;
      pairs.emplace((uint64_t{d.first} << 32) | d.second, d.cp);
      seconds.insert(d.second);
    }
  }
};

const CompositionTables& composition_tables() {
  static const CompositionTables tables;
  return tables;
}

// Whether the character might not survive NFC unchanged, or might change its neighbour.
bool needs_work(char32_t cp, const CompositionTables& tables) {
  if (cp < 0x300) return false;
  if (combining_class(cp) != 0) return true;
  if (cp >= kLBase + kLCount && cp < 0x1200) return true;  // Hangul vowels and trailing jamo
  if (const auto* d = find_decomposition(cp); d && !d->composes) return true;
  return tables.seconds.count(cp) != 0;
}

void decompose(char32_t cp, std::vector<char32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (const auto* d = find_decomposition(cp)) {
    decompose(d->first, out);
    if (d->second != 0) decompose(d->second, out);
    return;
  }
  out.push_back(cp);
}

char32_t compose(char32_t first, char32_t second, const CompositionTables& tables) {
  if (first >= kLBase && first < kLBase + kLCount && second >= kVBase && second < kVBase + kVCount) {
    return kSBase + ((first - kLBase) * kVCount + (second - kVBase)) * kTCount;
  }
  if (first >= kSBase && first < kSBase + kSCount && (first - kSBase) % kTCount == 0 &&
      second > kTBase && second < kTBase + kTCount) {
    return first + (second - kTBase);
  }
  if (first >= kRawByte || second >= kRawByte) return 0;
  const auto it = tables.pairs.find((uint64_t{first} << 32) | second);
  return it == tables.pairs.end() ? 0 : it->second;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp >= kRawByte) {
    out.push_back(static_cast<char>(cp - kRawByte));
  } else if (cp < 0x80) {
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

}  // namespace

std::string to_nfc(std::string_view text) {
  const CompositionTables& tables = composition_tables();
  bool work = false;
  for (size_t pos = 0; pos < text.size() && !work;) {
    if (static_cast<unsigned char>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const DecodedChar c = decode_utf8(text, pos);
    work = needs_work(c.cp, tables);
    pos += c.len;
  }
  if (!work) return std::string(text);

  // 1. Full canonical decomposition.
  std::vector<char32_t> cps;
  cps.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const DecodedChar c = decode_utf8(text, pos);
    if (c.cp == unicode_detail::kReplacementChar && c.len == 1) {  // not UTF-8: kept as is
      cps.push_back(kRawByte + static_cast<unsigned char>(text[pos]));
    } else {
      decompose(c.cp, cps);
    }
    pos += c.len;
  }
  // 2. Canonical ordering: each run of non-starters sorted by class, stably.
  for (size_t i = 0; i < cps.size();) {
    if (combining_class(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && combining_class(cps[j]) != 0) ++j;
    std::stable_sort(cps.begin() + i, cps.begin() + j,
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // 3. Canonical composition: a character joins the last starter unless something between
  // them has a class >= its own (or, when it is a starter itself, anything is between).
  std::vector<char32_t> out;
  out.reserve(cps.size());
  size_t starter = 0;
  int last_class = -1;  // -1: no starter yet
  for (const char32_t cp : cps) {
    const int cls = combining_class(cp);
    if (last_class >= 0 && !out.empty()) {
      const bool blocked = !(last_class == 0 ? out.size() - 1 == starter : last_class < cls);
      if (!blocked) {
        if (const char32_t composite = compose(out[starter], cp, tables)) {
          out[starter] = composite;
          continue;
        }
      }
    }
    if (cls == 0) {
      starter = out.size();
      last_class = 0;
    } else if (last_class >= 0) {
      last_class = cls;
    }
    out.push_back(cp);
  }
  std::string result;
  result.reserve(text.size());
  for (const char32_t cp : out) append_utf8(result, cp);
  return result;
}

}  // namespace flotilla::text
