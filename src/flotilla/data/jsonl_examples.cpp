#include "flotilla/data/jsonl_examples.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::data {
namespace {

constexpr const char* kJsonlExamplesComponent = "data/jsonl";

using json = nlohmann::json;

LineError error(InvalidReason reason, std::string message) { return {reason, std::move(message)}; }

std::variant<ExampleRecord, LineError> parse_messages(const json& messages) {
  if (!messages.is_array()) {
    return error(InvalidReason::wrong_type,
                 fmt::format("\"messages\" is {}, expected an array of {{\"role\", \"content\"}} objects",
                             json_type_name(messages)));
  }
  if (messages.empty()) return error(InvalidReason::bad_conversation, "\"messages\" is empty");
  ChatRecord chat;
  chat.messages.reserve(messages.size());
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const size_t n = i + 1;  // messages are counted from 1 in errors, like lines
    if (!m.is_object()) {
      return error(InvalidReason::wrong_type,
                   fmt::format("message {} is {}, expected an object {{\"role\", \"content\"}}", n,
                               json_type_name(m)));
    }
    const auto role = m.find("role");
    if (role == m.end()) return error(InvalidReason::wrong_type, fmt::format("message {} has no \"role\"", n));
    if (!role->is_string()) {
      return error(InvalidReason::wrong_type,
                   fmt::format("message {}: \"role\" is {}, expected a string", n, json_type_name(*role)));
    }
    const auto content = m.find("content");
    if (content == m.end()) {
      return error(InvalidReason::wrong_type, fmt::format("message {} has no \"content\"", n));
    }
    if (!content->is_string()) {
      return error(InvalidReason::wrong_type,
                   fmt::format("message {}: \"content\" is {}, expected a string", n,
                               json_type_name(*content)));
    }
    const auto& role_text = role->get_ref<const std::string&>();
    Message message;
    if (role_text == "system") {
      message.role = Role::system;
    } else if (role_text == "user") {
      message.role = Role::user;
    } else if (role_text == "assistant") {
      message.role = Role::assistant;
    } else {
      return error(InvalidReason::unknown_role,
                   fmt::format("message {} has unknown role '{}' (expected system, user, assistant)", n,
                               role_text));
    }
    message.content = content->get<std::string>();
    chat.messages.push_back(std::move(message));
  }
  return ExampleRecord(std::move(chat));
}

std::variant<ExampleRecord, LineError> parse_object(const json& j) {
  if (const auto messages = j.find("messages"); messages != j.end()) return parse_messages(*messages);
  if (const auto prompt = j.find("prompt"); prompt != j.end()) {
    const auto completion = j.find("completion");
    if (completion == j.end()) {
      return error(InvalidReason::wrong_type, "has \"prompt\" but no \"completion\"");
    }
    for (const auto& [key, value] : {std::pair{"prompt", prompt}, std::pair{"completion", completion}}) {
      if (!value->is_string()) {
        return error(InvalidReason::wrong_type,
                     fmt::format("\"{}\" is {}, expected a string", key, json_type_name(*value)));
      }
    }
    return ExampleRecord(CompletionRecord{prompt->get<std::string>(), completion->get<std::string>()});
  }
  if (const auto text = j.find("text"); text != j.end()) {
    if (!text->is_string()) {
      return error(InvalidReason::wrong_type,
                   fmt::format("\"text\" is {}, expected a string", json_type_name(*text)));
    }
    return ExampleRecord(TextRecord{text->get<std::string>()});
  }
  if (j.contains("completion")) return error(InvalidReason::wrong_type, "has \"completion\" but no \"prompt\"");
  return error(InvalidReason::unknown_format,
               "none of the known keys: expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}");
}

}  // namespace

std::string_view role_name(Role role) {
  switch (role) {
    case Role::system: return "system";
    case Role::user: return "user";
    case Role::assistant: return "assistant";
  }
  return "?";
}

std::string_view invalid_reason_name(InvalidReason reason) {
  switch (reason) {
    case InvalidReason::invalid_utf8: return "invalid_utf8";
    case InvalidReason::invalid_json: return "invalid_json";
    case InvalidReason::unknown_format: return "unknown_format";
    case InvalidReason::wrong_type: return "wrong_type";
    case InvalidReason::unknown_role: return "unknown_role";
    case InvalidReason::bad_conversation: return "bad_conversation";
  }
  return "?";
}

size_t valid_utf8_prefix(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    uint32_t min = 0;
    uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, min = 0x80, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, min = 0x800, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, min = 0x10000, cp = c & 0x07;
    } else {
      return i;  // a continuation byte where a sequence should start, or 0xF8..0xFF
    }
    if (n - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return n;
}

void throw_line_error(std::string_view source, size_t line, std::string_view what) {
  throw InputError(kJsonlExamplesComponent, fmt::format("{}:{}: {}", source, line, what));
}

std::vector<JsonlLine> jsonl_lines(std::string_view content) {
  if (content.starts_with("\xEF\xBB\xBF")) content.remove_prefix(3);
  std::vector<JsonlLine> lines;
  size_t number = 0;
  while (!content.empty()) {
    const size_t end = content.find('\n');
    std::string_view line = content.substr(0, end);
    content.remove_prefix(end == std::string_view::npos ? content.size() : end + 1);
    ++number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t\r\f\v") == std::string_view::npos) continue;
    lines.push_back({number, line});
  }
  return lines;
}

std::variant<ExampleRecord, LineError> parse_example_line(std::string_view line) {
  // Checked before the JSON parser so the message can say where: nlohmann would also
  // refuse bad bytes inside strings, but as a generic syntax error.
  if (const size_t valid = valid_utf8_prefix(line); valid != line.size()) {
    return error(InvalidReason::invalid_utf8,
                 fmt::format("invalid UTF-8 at byte {} (0x{:02X})", valid + 1,
                             static_cast<unsigned char>(line[valid])));
  }
  json j;
  try {
    j = json::parse(line);
  } catch (const json::exception& e) {
    return error(InvalidReason::invalid_json, fmt::format("not valid JSON: {}", json_error_text(e)));
  }
  if (!j.is_object()) {
    return error(InvalidReason::unknown_format,
                 fmt::format("expected a JSON object, found {}", json_type_name(j)));
  }
  return parse_object(j);
}

JsonlExamples parse_jsonl_examples(std::span<const JsonlLine> lines, std::string_view source,
                                   bool skip_invalid) {
  if (lines.empty()) {
    throw InputError(kJsonlExamplesComponent, fmt::format("{}: empty: no examples (expected one JSON object per line)", source));
  }
  JsonlExamples out;
  out.records.reserve(lines.size());
  for (const JsonlLine& line : lines) {
    auto parsed = parse_example_line(line.text);
    if (auto* bad = std::get_if<LineError>(&parsed)) {
      if (!skip_invalid) throw_line_error(source, line.number, bad->message);
      ++out.skipped[std::string(invalid_reason_name(bad->reason))];
      continue;
    }
    out.records.push_back({line.number, std::move(std::get<ExampleRecord>(parsed))});
  }
  if (out.records.empty()) {
    throw InputError(kJsonlExamplesComponent, fmt::format("{}: no valid examples: all {} lines were invalid and skipped",
                                             source, lines.size()));
  }
  return out;
}

JsonlExamples parse_jsonl_examples(std::string_view content, std::string_view source, bool skip_invalid) {
  const std::vector<JsonlLine> lines = jsonl_lines(content);
  return parse_jsonl_examples(lines, source, skip_invalid);
}

JsonlExamples read_jsonl_examples(const std::filesystem::path& path, bool skip_invalid) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    throw InputError(kJsonlExamplesComponent, fmt::format("{}: no such file", path.string()));
  }
  const std::string content = read_text_file(path);
  return parse_jsonl_examples(std::string_view(content), path.string(), skip_invalid);
}

}  // namespace flotilla::data
