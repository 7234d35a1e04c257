// JSONL example lines: the three formats, and one file:line error per kind of bad input.
#include "flotilla/data/jsonl_examples.hpp"

#include <gtest/gtest.h>

#include "data_test_util.hpp"

namespace flotilla::data {
namespace {

using test_util::input_error_of;
using test_util::TempDir;
using ::testing::HasSubstr;

std::string parse_error(const std::string& content, bool skip_invalid = false) {
  return input_error_of([&] { parse_jsonl_examples(std::string_view(content), "f.jsonl", skip_invalid); });
}

TEST(JsonlExamples, TextLine) {
  const auto ex = parse_jsonl_examples(std::string_view("{\"text\": \"Ahoy\", \"id\": 7}\n"), "f.jsonl", false);
  ASSERT_EQ(ex.records.size(), 1u);
  EXPECT_EQ(ex.records[0].line, 1u);
  EXPECT_EQ(std::get<TextRecord>(ex.records[0].record).text, "Ahoy");
}

TEST(JsonlExamples, PromptCompletionLine) {
  const auto ex =
      parse_jsonl_examples(std::string_view("\n{\"prompt\": \"Say hi\", \"completion\": \"Ahoy\"}\n"), "f.jsonl", false);
  ASSERT_EQ(ex.records.size(), 1u);
  EXPECT_EQ(ex.records[0].line, 2u);  // blank lines are skipped but counted
  const auto& pc = std::get<CompletionRecord>(ex.records[0].record);
  EXPECT_EQ(pc.prompt, "Say hi");
  EXPECT_EQ(pc.completion, "Ahoy");
}

TEST(JsonlExamples, ChatLineWithAllRoles) {
  const auto ex = parse_jsonl_examples(
      std::string_view(R"({"messages": [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hi"},)"
                       R"( {"role": "assistant", "content": "Ahoy", "weight": 1}]})"
                       "\r\n"),
      "f.jsonl", false);
  ASSERT_EQ(ex.records.size(), 1u);
  const auto& chat = std::get<ChatRecord>(ex.records[0].record);
  ASSERT_EQ(chat.messages.size(), 3u);
  EXPECT_EQ(chat.messages[0].role, Role::system);
  EXPECT_EQ(chat.messages[1].role, Role::user);
  EXPECT_EQ(chat.messages[2].role, Role::assistant);
  EXPECT_EQ(chat.messages[2].content, "Ahoy");
}

TEST(JsonlExamples, Utf8ContentAndBomAreKept) {
  const auto ex = parse_jsonl_examples(std::string_view("\xEF\xBB\xBF{\"text\": \"caf\xC3\xA9 \\u00e9 \xF0\x9F\x8F\xB4\"}"),
                                       "f.jsonl", false);
  EXPECT_EQ(std::get<TextRecord>(ex.records[0].record).text, "caf\xC3\xA9 \xC3\xA9 \xF0\x9F\x8F\xB4");
}

TEST(JsonlExamples, MalformedJsonNamesFileAndLine) {
  EXPECT_THAT(parse_error("{\"text\": \"a\"}\n{\"text\": \"b\"\n"), HasSubstr("f.jsonl:2: not valid JSON"));
}

TEST(JsonlExamples, LineWithNoKnownKeyNamesTheFormats) {
  EXPECT_THAT(parse_error("{\"txt\": \"a\"}"), HasSubstr("f.jsonl:1: none of the known keys"));
  EXPECT_THAT(parse_error("[1, 2]"), HasSubstr("f.jsonl:1: expected a JSON object, found an array"));
}

TEST(JsonlExamples, WrongTypes) {
  EXPECT_THAT(parse_error("{\"text\": 5}"), HasSubstr("f.jsonl:1: \"text\" is a number, expected a string"));
  EXPECT_THAT(parse_error("{\"prompt\": \"a\", \"completion\": null}"),
              HasSubstr("f.jsonl:1: \"completion\" is null, expected a string"));
  EXPECT_THAT(parse_error("{\"prompt\": \"a\"}"), HasSubstr("f.jsonl:1: has \"prompt\" but no \"completion\""));
  EXPECT_THAT(parse_error("{\"messages\": \"hi\"}"), HasSubstr("f.jsonl:1: \"messages\" is a string"));
  EXPECT_THAT(parse_error("{\"messages\": [{\"role\": \"user\", \"content\": [1]}]}"),
              HasSubstr("f.jsonl:1: message 1: \"content\" is an array, expected a string"));
  EXPECT_THAT(parse_error("{\"messages\": [{\"role\": \"user\"}]}"), HasSubstr("f.jsonl:1: message 1 has no \"content\""));
  EXPECT_THAT(parse_error("{\"messages\": [\"hi\"]}"), HasSubstr("f.jsonl:1: message 1 is a string"));
}

TEST(JsonlExamples, UnknownRoleIsNamedWithItsMessageNumber) {
  const std::string content =
      "{\"text\": \"ok\"}\n"
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"robot\", \"content\": \"Beep\"}]}\n";
  EXPECT_EQ(parse_error(content),
            "[data/jsonl] f.jsonl:2: message 2 has unknown role 'robot' (expected system, user, assistant)");
}

TEST(JsonlExamples, EmptyMessagesIsABadConversation) {
  EXPECT_THAT(parse_error("{\"messages\": []}"), HasSubstr("f.jsonl:1: \"messages\" is empty"));
}

TEST(JsonlExamples, EmptyFileIsAnError) {
  EXPECT_THAT(parse_error(""), HasSubstr("f.jsonl: empty: no examples"));
  EXPECT_THAT(parse_error("\n  \n\r\n"), HasSubstr("f.jsonl: empty: no examples"));
  EXPECT_THAT(parse_error("", /*skip_invalid=*/true), HasSubstr("f.jsonl: empty"));
}

TEST(JsonlExamples, InvalidUtf8IsFoundAndPlaced) {
  EXPECT_THAT(parse_error("{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": \"bad \xC3\x28\"}\n"),
              HasSubstr("f.jsonl:3: invalid UTF-8 at byte 15 (0xC3)"));
  EXPECT_THAT(parse_error("{\"text\": \"\xED\xA0\x80\"}"), HasSubstr("f.jsonl:1: invalid UTF-8"));  // a surrogate
  EXPECT_THAT(parse_error("{\"text\": \"\xC0\xAF\"}"), HasSubstr("f.jsonl:1: invalid UTF-8"));      // overlong '/'
  EXPECT_THAT(parse_error("{\"text\": \"\\ud800\"}"), HasSubstr("f.jsonl:1: not valid JSON"));     // lone \u surrogate
}

TEST(JsonlExamples, SkipInvalidCountsEachReason) {
  const std::string content =
      "{\"text\": \"one\"}\n"
      "{\"text\": \n"
      "{\"other\": 1}\n"
      "{\"text\": 3}\n"
      "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n"
      "{\"text\": \"\xFF\"}\n"
      "{\"messages\": []}\n"
      "{\"prompt\": \"p\", \"completion\": \"c\"}\n"
      "not json either\n";
  const auto ex = parse_jsonl_examples(std::string_view(content), "f.jsonl", true);
  ASSERT_EQ(ex.records.size(), 2u);
  EXPECT_EQ(ex.records[0].line, 1u);
  EXPECT_EQ(ex.records[1].line, 8u);
  const SkipCounts expected = {{"invalid_json", 2}, {"unknown_format", 1}, {"wrong_type", 1},
                               {"unknown_role", 1}, {"invalid_utf8", 1},   {"bad_conversation", 1}};
  EXPECT_EQ(ex.skipped, expected);
}

TEST(JsonlExamples, AllLinesInvalidIsAnErrorEvenWhenSkipping) {
  EXPECT_THAT(parse_error("{\"x\": 1}\n{\"y\": 2}\n", true), HasSubstr("f.jsonl: no valid examples: all 2 lines"));
}

TEST(JsonlExamples, MissingFileIsNamed) {
  TempDir dir;
  EXPECT_THAT(input_error_of([&] { read_jsonl_examples(dir.path() / "valid.jsonl", false); }),
              HasSubstr("valid.jsonl: no such file"));
}

TEST(Utf8, ValidPrefix) {
  EXPECT_EQ(valid_utf8_prefix(""), 0u);
  EXPECT_EQ(valid_utf8_prefix("abc"), 3u);
  EXPECT_EQ(valid_utf8_prefix("a\xF4\x8F\xBF\xBF"), 5u);   // U+10FFFF
  EXPECT_EQ(valid_utf8_prefix("a\xF4\x90\x80\x80"), 1u);   // above U+10FFFF
  EXPECT_EQ(valid_utf8_prefix("ab\xE2\x82"), 2u);          // cut short
  EXPECT_EQ(valid_utf8_prefix("\x80"), 0u);                // stray continuation byte
  EXPECT_EQ(valid_utf8_prefix("\xE0\x80\x80"), 0u);        // overlong NUL
}

}  // namespace
}  // namespace flotilla::data
