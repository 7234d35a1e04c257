// Utf8Streamer: pieces that split code points come out as whole code points only.
#include "flotilla/text/utf8_streamer.hpp"

#include <gtest/gtest.h>

#include <string>

#include "flotilla/text/byte_tokenizer.hpp"

namespace flotilla::text {
namespace {

const std::string kReplacement = "\xEF\xBF\xBD";

TEST(Utf8Streamer, AsciiPassesStraightThrough) {
  Utf8Streamer s;
  EXPECT_EQ(s.push("Ahoy!"), "Ahoy!");
  EXPECT_EQ(s.pending_bytes(), 0u);
  EXPECT_EQ(s.finish(), "");
}

TEST(Utf8Streamer, HoldsBackASplitCodePointUntilComplete) {
  Utf8Streamer s;
  const std::string ship = "船";  // E8 88 B9
  ASSERT_EQ(ship.size(), 3u);
  EXPECT_EQ(s.push(ship.substr(0, 1)), "");
  EXPECT_EQ(s.pending_bytes(), 1u);
  EXPECT_EQ(s.push(ship.substr(1, 1)), "");
  EXPECT_EQ(s.push(ship.substr(2, 1) + "!"), ship + "!");
  EXPECT_EQ(s.pending_bytes(), 0u);
}

TEST(Utf8Streamer, ByteByBytePiecesReassembleMixedText) {
  // Streaming generation with the byte tokenizer: one byte per token. Every emitted chunk
  // must be whole code points, and the chunks together the original text.
  ByteTokenizer tok;
  const std::string text = "Yo ho 🏴‍☠️ — 海賊 é 𝄞!";
  Utf8Streamer s;
  std::string out;
  for (int32_t id : tok.encode(text)) {
    const std::string chunk = s.push(tok.token_to_piece(id));
    Utf8Streamer check;  // a chunk that is whole code points streams through unchanged
    EXPECT_EQ(check.push(chunk), chunk);
    EXPECT_EQ(check.pending_bytes(), 0u);
    out += chunk;
  }
  out += s.finish();
  EXPECT_EQ(out, text);
}

TEST(Utf8Streamer, FourByteEmojiSplitAcrossTwoPushes) {
  Utf8Streamer s;
  const std::string anchor = "\xF0\x9F\xAA\x9D";  // U+1FA9D
  EXPECT_EQ(s.push(anchor.substr(0, 2)), "");
  EXPECT_EQ(s.pending_bytes(), 2u);
  EXPECT_EQ(s.push(anchor.substr(2)), anchor);
}

TEST(Utf8Streamer, StrayContinuationByteBecomesReplacement) {
  Utf8Streamer s;
  EXPECT_EQ(s.push("a\x80z"), "a" + kReplacement + "z");
}

TEST(Utf8Streamer, InvalidLeadBytesBecomeReplacement) {
  Utf8Streamer s;
  EXPECT_EQ(s.push("\xC0\xFF"), kReplacement + kReplacement);
}

TEST(Utf8Streamer, SequenceInterruptedByNewLeadReplacesPrefixAndKeepsGoing) {
  Utf8Streamer s;
  // E8 88 starts a 3-byte code point; 'x' cuts it short.
  EXPECT_EQ(s.push("\xE8\x88x"), kReplacement + "x");
  EXPECT_EQ(s.push("\xE8\xE8\x88\xB9"), kReplacement + "船");
}

TEST(Utf8Streamer, OverlongAndSurrogateFormsAreRejected) {
  Utf8Streamer s;
  // E0 80 would be overlong; ED A0 a surrogate; F4 90 past U+10FFFF.
  EXPECT_EQ(s.push("\xE0\x80"), kReplacement + kReplacement);
  EXPECT_EQ(s.push("\xED\xA0"), kReplacement + kReplacement);
  EXPECT_EQ(s.push("\xF4\x90"), kReplacement + kReplacement);
  EXPECT_EQ(s.pending_bytes(), 0u);
}

TEST(Utf8Streamer, FinishReplacesAnIncompleteTailAndResets) {
  Utf8Streamer s;
  EXPECT_EQ(s.push("ok\xF0\x9F"), "ok");
  EXPECT_EQ(s.finish(), kReplacement);
  EXPECT_EQ(s.pending_bytes(), 0u);
  EXPECT_EQ(s.push("again"), "again");
}

}  // namespace
}  // namespace flotilla::text
