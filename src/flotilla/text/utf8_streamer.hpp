// Utf8Streamer: turns token pieces, which may split a UTF-8 code point ("é" is two byte
// tokens, an emoji four), into text that is safe to print as it arrives. It holds back
// the bytes of an incomplete code point until the rest comes.
//
//   Utf8Streamer s;
//   for (id : generated) std::cout << s.push(tok.token_to_piece(id)) << std::flush;
//   std::cout << s.finish();
//
// Bytes that can never become a valid code point (a stray continuation byte, 0xC0/0xC1,
// 0xF5..0xFF, an overlong or surrogate form, a sequence cut short by a new lead byte) come
// out as U+FFFD, one per maximal invalid subpart as in Unicode's "best practice".
#pragma once

#include <string>
#include <string_view>

namespace flotilla::text {

class Utf8Streamer {
 public:
  // Appends `bytes` and returns every complete code point now available.
  std::string push(std::string_view bytes);
  // End of stream: returns U+FFFD if an incomplete code point was pending, else "".
  // The streamer is empty afterwards and can be reused.
  std::string finish();
  // Bytes held back (0..3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  std::string pending_;  // a valid prefix of one code point, at most 3 bytes
};

}  // namespace flotilla::text
