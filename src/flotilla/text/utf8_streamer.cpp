#include "flotilla/text/utf8_streamer.hpp"

#include <cstdint>

namespace flotilla::text {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the code point a lead byte starts; 0 if it cannot start one.
int sequence_length(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// Whether `b` may follow the valid prefix `prefix` (Unicode Table 3-7). The second byte's
// range depends on the lead: it rules out overlong forms (E0, F0), surrogates (ED) and
// code points past U+10FFFF (F4).
bool continues(std::string_view prefix, uint8_t b) {
  if (prefix.size() == 1) {
    switch (static_cast<uint8_t>(prefix[0])) {
      case 0xE0: return b >= 0xA0 && b <= 0xBF;
      case 0xED: return b >= 0x80 && b <= 0x9F;
      case 0xF0: return b >= 0x90 && b <= 0xBF;
      case 0xF4: return b >= 0x80 && b <= 0x8F;
      default: break;
    }
  }
  return b >= 0x80 && b <= 0xBF;
}

}  // namespace

std::string Utf8Streamer::push(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() + pending_.size());
  for (const char c : bytes) {
    const auto b = static_cast<uint8_t>(c);
    if (!pending_.empty()) {
      if (continues(pending_, b)) {
        pending_.push_back(c);
        if (static_cast<int>(pending_.size()) == sequence_length(static_cast<uint8_t>(pending_[0]))) {
          out += pending_;
          pending_.clear();
        }
        continue;
      }
      // The pending prefix can never complete; `b` starts afresh below.
      out += kReplacement;
      pending_.clear();
    }
    const int length = sequence_length(b);
    if (length == 1) {
      out.push_back(c);
    } else if (length == 0) {
      out += kReplacement;
    } else {
      pending_.push_back(c);
    }
  }
  return out;
}

std::string Utf8Streamer::finish() {
  if (pending_.empty()) return {};
  pending_.clear();
  return std::string(kReplacement);
}

}  // namespace flotilla::text
