// Fine-tuning examples from JSONL, in mlx_lm's three line formats:
//
//   {"text": "..."}                                   plain text (pretraining style)
//   {"prompt": "...", "completion": "..."}            one instruction and its answer
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   a chat
//
// Vocabulary: a *line* is one line of the file (numbered from 1, blank lines skipped); a
// *record* is what a valid line holds; an *invalid* line is one the reader refuses, with a
// reason. Other keys on a line are ignored (datasets carry ids, sources, scores). When a line
// has several known keys the first of messages, prompt, text decides its format.
//
// A refused line is one InputError "<file>:<line>: <what>" — or, with skip_invalid, counted
// under its reason and left out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace flotilla::data {

enum class Role { system, user, assistant };
std::string_view role_name(Role role);

struct Message {
  Role role = Role::user;
  std::string content;
};

struct TextRecord {
  std::string text;
};
struct CompletionRecord {
  std::string prompt;
  std::string completion;
};
struct ChatRecord {
  std::vector<Message> messages;  // at least one
};
using ExampleRecord = std::variant<TextRecord, CompletionRecord, ChatRecord>;

// Why a line was refused; the names are what summaries and index.json print.
enum class InvalidReason {
  invalid_utf8,      // bytes that are not UTF-8
  invalid_json,      // not parseable JSON
  unknown_format,    // an object with none of "text", "prompt", "messages" (or not an object)
  wrong_type,        // a known key with a value of the wrong type, or "prompt" without "completion"
  unknown_role,      // a message role other than system, user, assistant
  bad_conversation,  // empty "messages", or an order the chat template refuses
};
std::string_view invalid_reason_name(InvalidReason reason);

// Lines skipped per reason name (only reasons that occurred).
using SkipCounts = std::map<std::string, size_t>;

struct LineError {
  InvalidReason reason;
  std::string message;  // without the "<file>:<line>: " prefix
};

// One non-blank line of a JSONL file.
struct JsonlLine {
  size_t number = 0;  // 1-based line number in the file
  std::string_view text;  // without "\n" / "\r\n"
};

struct NumberedRecord {
  size_t line = 0;
  ExampleRecord record;
};

struct JsonlExamples {
  std::vector<NumberedRecord> records;  // in line order
  SkipCounts skipped;
};

// The non-blank lines of `content` (a leading UTF-8 BOM is dropped).
std::vector<JsonlLine> jsonl_lines(std::string_view content);

// Parses one line; never throws for bad input (bad input is the LineError).
std::variant<ExampleRecord, LineError> parse_example_line(std::string_view line);

// Parses the given lines. `source` names the file in errors. Without skip_invalid the
// first invalid line is an InputError "<source>:<line>: <what>"; with it, invalid lines are
// counted in `skipped`. No lines at all, or no valid line: InputError naming `source`.
JsonlExamples parse_jsonl_examples(std::span<const JsonlLine> lines, std::string_view source,
                                   bool skip_invalid);
JsonlExamples parse_jsonl_examples(std::string_view content, std::string_view source,
                                   bool skip_invalid);

// Reads and parses a file; InputError naming it if it is missing or unreadable.
JsonlExamples read_jsonl_examples(const std::filesystem::path& path, bool skip_invalid);

// Length of the longest prefix of `text` that is valid UTF-8 (text.size() when all of it is):
// shortest forms only, no surrogates, nothing above U+10FFFF.
size_t valid_utf8_prefix(std::string_view text);

// The "<file>:<line>: " prefix every line error carries; component "data/jsonl".
[[noreturn]] void throw_line_error(std::string_view source, size_t line, std::string_view what);

}  // namespace flotilla::data
