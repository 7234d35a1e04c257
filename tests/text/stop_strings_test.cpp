// StopStrings: generation ends at the first stop string, which is never printed, and text
// is held back only while it could still become one.
#include "flotilla/text/stop_strings.hpp"

#include <gtest/gtest.h>

#include <random>
#include <string>

#include "../test_seed.hpp"

namespace flotilla::text {
namespace {

TEST(StopStrings, WithoutStopsTextPassesStraightThrough) {
  StopStrings stops({});
  EXPECT_EQ(stops.push("Ahoy <|im_end|>"), "Ahoy <|im_end|>");
  EXPECT_FALSE(stops.stopped());
  EXPECT_EQ(stops.finish(), "");
}

TEST(StopStrings, AStopSplitAcrossPiecesEndsTheTextBeforeIt) {
  StopStrings stops({"<|im_end|>"});
  EXPECT_EQ(stops.push("Aye, matey!"), "Aye, matey!");
  EXPECT_EQ(stops.push("<|im"), "");  // could be the stop string: held
  EXPECT_FALSE(stops.stopped());
  EXPECT_EQ(stops.push("_end|>\n<|im_start|>user"), "");
  EXPECT_TRUE(stops.stopped());
  EXPECT_EQ(stops.push("more"), "");
  EXPECT_EQ(stops.finish(), "");
}

TEST(StopStrings, AHeldTailThatTurnsOutDifferentIsPrinted) {
  StopStrings stops({"<|im_end|>"});
  EXPECT_EQ(stops.push("a <|i"), "a ");
  EXPECT_EQ(stops.push("s| b"), "<|is| b");
  EXPECT_EQ(stops.push(" <"), " ");
  EXPECT_EQ(stops.finish(), "<");  // generation ended: the held "<" was text
}

TEST(StopStrings, TheEarliestOfSeveralStopsWins) {
  StopStrings stops({"\nUser:", "</s>"});
  EXPECT_EQ(stops.push("one</s>two\nUser:"), "one");
  EXPECT_TRUE(stops.stopped());
}

TEST(StopStrings, RandomPiecesGiveTheTextBeforeTheFirstStop) {
  // Reference: find() on the whole text. Pieces of 1..6 bytes from a small alphabet, so
  // partial matches ("<|", "<|im_e") are frequent.
  std::mt19937_64 rng(flotilla::testing::test_seed());
  const std::string alphabet = "<|im_end>ab \n";
  for (int round = 0; round < 2000; ++round) {
    std::string text;
    const int n = std::uniform_int_distribution<int>(0, 60)(rng);
    for (int i = 0; i < n; ++i) text += alphabet[std::uniform_int_distribution<size_t>(0, alphabet.size() - 1)(rng)];
    if (rng() % 2) text.insert(std::uniform_int_distribution<size_t>(0, text.size())(rng), "<|im_end|>");
    const std::vector<std::string> stop_list = {"<|im_end|>", "|>b"};
    size_t first = std::string::npos;
    for (const std::string& s : stop_list) first = std::min(first, text.find(s));
    const std::string expected = text.substr(0, first);

    StopStrings stops(stop_list);
    std::string out;
    size_t at = 0;
    while (at < text.size() && !stops.stopped()) {
      const size_t len = std::uniform_int_distribution<size_t>(1, 6)(rng);
      out += stops.push(std::string_view(text).substr(at, len));
      at += len;
    }
    out += stops.finish();
    ASSERT_EQ(out, expected) << "text: " << text;
    ASSERT_EQ(stops.stopped(), first != std::string::npos) << "text: " << text;
  }
}

}  // namespace
}  // namespace flotilla::text
