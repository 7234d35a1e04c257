#include "flotilla/data/chat_template.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/file.hpp"
#include "flotilla/base/json_error.hpp"

namespace flotilla::data {
namespace {

constexpr const char* kChatTemplateComponent = "data/chat";

// The literal Llama 3.1+ templates put before the system message; the date is the
// template's own default (`{%- set date_string = "26 Jul 2024" %}`). Llama 3.2's template
// asks Hugging Face for today's date (strftime_now) when it can: we keep the fixed default
// so that prepared data does not depend on the day it was prepared.
constexpr std::string_view kKnowledgeDateMarker = "Cutting Knowledge Date";
constexpr std::string_view kDefaultDateString = "26 Jul 2024";

// Decodes the code point starting at s[i] (valid UTF-8 assumed; a stray byte counts as
// one non-space unit). Returns {code point, length}.
std::pair<uint32_t, size_t> decode_at(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  auto cont = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) & 0x3Fu : 0u; };
  if (c < 0x80) return {c, 1};
  if ((c & 0xE0) == 0xC0 && i + 1 < s.size()) return {((c & 0x1Fu) << 6) | cont(1), 2};
  if ((c & 0xF0) == 0xE0 && i + 2 < s.size()) return {((c & 0x0Fu) << 12) | (cont(1) << 6) | cont(2), 3};
  if ((c & 0xF8) == 0xF0 && i + 3 < s.size())
    return {((c & 0x07u) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3), 4};
  return {0xFFFFFFFF, 1};
}

// Python's str.isspace(): bidi class WS, B or S, or category Zs.
bool is_python_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Start of the code point that ends at s[end - 1].
size_t previous_start(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && end - i < 4 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

Segment text(std::string t, bool trainable = false) { return Segment{std::move(t), -1, trainable}; }

// Appends to the last segment when it has the same trainability (fewer, longer segments
// tokenize the same and faster).
void emit(std::vector<Segment>& out, std::string t, bool trainable = false) {
  if (t.empty()) return;
  if (!out.empty() && out.back().token < 0 && out.back().trainable == trainable) {
    out.back().text += t;
  } else {
    out.push_back(text(std::move(t), trainable));
  }
}

struct SplitSystem {
  std::optional<std::string> system;  // the first message's content, or the default
  std::span<const Message> rest;      // the messages after it
};

SplitSystem split_system(const ChatTemplate& tmpl, std::span<const Message> messages) {
  if (!messages.empty() && messages.front().role == Role::system) {
    return {messages.front().content, messages.subspan(1)};
  }
  return {tmpl.default_system, messages};
}

// Llama 3 (Meta-Llama-3-8B-Instruct):
//   {% set loop_messages = messages %}{% for message in loop_messages %}{% set content =
//   '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim
//   + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}
//   {{ content }}{% endfor %}
// Llama 3.1 extracts a first system message (trimmed), always writes a system turn with
// "Cutting Knowledge Date: December 2023\nToday Date: " + date_string + "\n\n" before its
// content (empty when there is none), then renders the other messages the same way.
void render_llama3(const ChatTemplate& tmpl, std::span<const Message> messages, std::vector<Segment>& out) {
  emit(out, "<|begin_of_text|>");
  const auto header = [](Role role) {
    return fmt::format("<|start_header_id|>{}<|end_header_id|>\n\n", role_name(role));
  };
  const SplitSystem split = split_system(tmpl, messages);
  if (split.system) {
    emit(out, header(Role::system) + tmpl.system_prefix + std::string(python_strip(*split.system)) +
                  "<|eot_id|>");
  }
  for (const Message& m : split.rest) {
    const std::string body = std::string(python_strip(m.content)) + "<|eot_id|>";
    emit(out, header(m.role));
    emit(out, body, m.role == Role::assistant);
  }
}

// ChatML as Qwen2-Instruct writes it:
//   {% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}
//   {{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}
//   {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
//   {% endfor %}
// (no trimming; plain ChatML templates have no default system message).
void render_chatml(const ChatTemplate& tmpl, std::span<const Message> messages, std::vector<Segment>& out) {
  const SplitSystem split = split_system(tmpl, messages);
  if (split.system) emit(out, "<|im_start|>system\n" + tmpl.system_prefix + *split.system + "<|im_end|>\n");
  for (const Message& m : split.rest) {
    emit(out, fmt::format("<|im_start|>{}\n", role_name(m.role)));
    if (m.role == Role::assistant) {
      emit(out, m.content + "<|im_end|>", true);
      emit(out, "\n");
    } else {
      emit(out, m.content + "<|im_end|>\n");
    }
  }
}

void check_alternation(std::span<const Message> loop, std::string_view family) {
  for (size_t i = 0; i < loop.size(); ++i) {
    if (loop[i].role == Role::system) {
      throw ConversationError(fmt::format(
          "message {} is a system message: the {} template allows one, only as the first message",
          i + 1 + 1, family));  // +1: loop starts after the first (system) message
    }
    if ((loop[i].role == Role::user) != (i % 2 == 0)) {
      throw ConversationError(fmt::format(
          "the {} template needs roles alternating user/assistant/user/... after an optional first "
          "system message",
          family));
    }
  }
}

// Llama 2 chat (meta-llama/Llama-2-7b-chat-hf):
//   {% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set
//   system_message = messages[0]['content'] %}{% else %}...{% set system_message = false %}
//   {% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') !=
//   (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate ...') }}
//   {% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content =
//   '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set
//   content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token +
//   '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}
//   {{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}
// The strip() covers the <<SYS>> block and the user text together. A system message
// elsewhere is refused (the Jinja would drop it silently at odd positions).
void render_llama2(const ChatTemplate& tmpl, std::span<const Message> messages, std::vector<Segment>& out) {
  const SplitSystem split = split_system(tmpl, messages);
  check_alternation(split.rest, "llama2");
  for (size_t i = 0; i < split.rest.size(); ++i) {
    const Message& m = split.rest[i];
    std::string content = m.content;
    if (i == 0 && split.system) {
      content = "<<SYS>>\n" + tmpl.system_prefix + *split.system + "\n<</SYS>>\n\n" + content;
    }
    const std::string stripped(python_strip(content));
    if (m.role == Role::user) {
      emit(out, "<s>[INST] " + stripped + " [/INST]");
    } else {
      emit(out, " " + stripped + " </s>", true);
    }
  }
}

// Mistral-7B-Instruct-v0.3 (tools branches left out):
//   {%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}
//   {%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}...
//   (alternation check: "After the optional system message, conversation roles must
//   alternate user/assistant/user/assistant/...")
//   {{- bos_token }}{%- for message in loop_messages %}{%- if message["role"] == "user" %}
//   {%- if loop.last and system_message is defined %}{{- "[INST] " + system_message + "\n\n" +
//   message["content"] + "[/INST]" }}{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}
//   {%- endif %}{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim +
//   eos_token}}{%- else %}{{- raise_exception("Only user and assistant roles are supported, with
//   the exception of an initial optional system message!") }}{%- endif %}{%- endfor %}
// The system message goes before the *last user message* (as Mistral's later templates
// write it, `message == user_messages[-1]`): `loop.last` would drop it from every
// conversation that ends with the assistant's answer — every training example — while at
// inference, where the last message is the user's, both rules give the same prompt.
void render_mistral(const ChatTemplate& tmpl, std::span<const Message> messages, std::vector<Segment>& out) {
  const SplitSystem split = split_system(tmpl, messages);
  check_alternation(split.rest, "mistral");
  size_t last_user = 0;
  for (size_t i = 0; i < split.rest.size(); ++i) {
    if (split.rest[i].role == Role::user) last_user = i;
  }
  emit(out, "<s>");
  for (size_t i = 0; i < split.rest.size(); ++i) {
    const Message& m = split.rest[i];
    if (m.role == Role::user) {
      if (i == last_user && split.system) {
        emit(out, "[INST] " + tmpl.system_prefix + *split.system + "\n\n" + m.content + "[/INST]");
      } else {
        emit(out, "[INST] " + m.content + "[/INST]");
      }
    } else {
      emit(out, std::string(" ").append(python_strip(m.content)).append("</s>"), true);
    }
  }
}

// The text of a Jinja string literal that starts at `from` and runs to `end_marker`, if it
// is a plain literal (no quotes or Jinja syntax inside); "\n" escapes become newlines.
std::optional<std::string> literal_until(std::string_view jinja, size_t from, std::string_view end_marker) {
  const size_t end = jinja.find(end_marker, from);
  if (end == std::string_view::npos) return std::nullopt;
  const std::string_view body = jinja.substr(from, end - from);
  if (body.find_first_of("'\"{}<>") != std::string_view::npos) return std::nullopt;
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] == '\\' && i + 1 < body.size() && body[i + 1] == 'n') {
      out.push_back('\n');
      ++i;
    } else {
      out.push_back(body[i]);
    }
  }
  return out;
}

// ChatML templates that insert a default system message write it as one literal:
// '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'. The "\n" is a real newline
// or the two characters \n, depending on how the JSON was escaped.
std::optional<std::string> chatml_default_system(std::string_view jinja) {
  constexpr std::string_view kOpen = "<|im_start|>system";
  for (size_t at = jinja.find(kOpen); at != std::string_view::npos; at = jinja.find(kOpen, at + 1)) {
    size_t from = at + kOpen.size();
    if (jinja.substr(from, 1) == "\n") {
      from += 1;
    } else if (jinja.substr(from, 2) == "\\n") {
      from += 2;
    } else {
      continue;
    }
    if (auto text = literal_until(jinja, from, "<|im_end|>"); text && !text->empty()) return text;
  }
  return std::nullopt;
}

std::string llama31_system_prefix(std::string_view jinja) {
  std::string date(kDefaultDateString);
  constexpr std::string_view kSet = "set date_string = \"";
  if (const size_t at = jinja.find(kSet); at != std::string_view::npos) {
    const size_t from = at + kSet.size();
    const size_t end = jinja.find('"', from);
    if (end != std::string_view::npos && end - from <= 32) date = std::string(jinja.substr(from, end - from));
  }
  return "Cutting Knowledge Date: December 2023\nToday Date: " + date + "\n\n";
}

std::string read_chat_template_string(const std::filesystem::path& model_dir, std::string* source) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path config = model_dir / "tokenizer_config.json";
  if (fs::exists(config, ec)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_text_file(config));
    } catch (const nlohmann::json::exception& e) {
      throw InputError(kChatTemplateComponent, fmt::format("{}: not valid JSON ({})", config.string(), json_error_text(e)));
    }
    if (j.is_object() && j.contains("chat_template")) {
      const nlohmann::json& t = j["chat_template"];
      *source = config.string();
      if (t.is_string()) return t.get<std::string>();
      if (t.is_array()) {
        for (const auto& entry : t) {
          if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
              entry["template"].is_string()) {
            return entry["template"].get<std::string>();
          }
        }
      }
      if (!t.is_null()) {
        throw InputError(kChatTemplateComponent, fmt::format("{}: \"chat_template\" is neither a string nor a list with a "
                                                 "\"default\" entry", config.string()));
      }
    }
  }
  const fs::path jinja = model_dir / "chat_template.jinja";
  if (fs::exists(jinja, ec)) {
    *source = jinja.string();
    return read_text_file(jinja);
  }
  return {};
}

}  // namespace

std::string_view chat_family_name(ChatFamily family) {
  switch (family) {
    case ChatFamily::llama2: return "llama2";
    case ChatFamily::llama3: return "llama3";
    case ChatFamily::mistral: return "mistral";
    case ChatFamily::chatml: return "chatml";
  }
  return "?";
}

ChatFamily parse_chat_family(std::string_view name) {
  for (ChatFamily f : {ChatFamily::llama2, ChatFamily::llama3, ChatFamily::mistral, ChatFamily::chatml}) {
    if (chat_family_name(f) == name) return f;
  }
  throw InputError(kChatTemplateComponent,
                   fmt::format("unknown chat template '{}' (known: llama2, llama3, mistral, chatml)", name));
}

std::string ChatTemplate::describe() const {
  std::string out(chat_family_name(family));
  if (!system_prefix.empty()) out += fmt::format(" (system prefix {:?})", system_prefix);
  if (default_system) out += fmt::format(" (default system {:?})", *default_system);
  return out;
}

std::string_view python_strip(std::string_view s) {
  size_t begin = 0;
  while (begin < s.size()) {
    const auto [cp, len] = decode_at(s, begin);
    if (!is_python_space(cp)) break;
    begin += len;
  }
  size_t end = s.size();
  while (end > begin) {
    const size_t start = previous_start(s, end);
    const auto [cp, len] = decode_at(s, start);
    if (start + len != end || !is_python_space(cp)) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

std::optional<ChatTemplate> detect_chat_template(std::string_view jinja) {
  ChatTemplate t;
  if (jinja.find("<|start_header_id|>") != std::string_view::npos) {
    t.family = ChatFamily::llama3;
    if (jinja.find(kKnowledgeDateMarker) != std::string_view::npos) {
      t.system_prefix = llama31_system_prefix(jinja);
      t.default_system = "";
    }
    return t;
  }
  if (jinja.find("<|im_start|>") != std::string_view::npos) {
    t.family = ChatFamily::chatml;
    t.default_system = chatml_default_system(jinja);
    return t;
  }
  if (jinja.find("[INST]") != std::string_view::npos) {
    if (jinja.find("<<SYS>>") != std::string_view::npos) {
      t.family = ChatFamily::llama2;
      return t;
    }
    if (jinja.find(" [/INST]") != std::string_view::npos) {
      throw InputError(kChatTemplateComponent,
                       "the chat template looks like Mistral v0.1/v0.2 (\"[INST] ... [/INST]\" with a space "
                       "before [/INST]), which flotilla does not render; pass --chat-template mistral to "
                       "use the Mistral v0.3 format (\"[INST] ...[/INST]\") instead");
    }
    t.family = ChatFamily::mistral;
    return t;
  }
  return std::nullopt;
}

ChatTemplateSource read_chat_template_source(const std::filesystem::path& model_dir) {
  ChatTemplateSource out;
  out.jinja = read_chat_template_string(model_dir, &out.file);
  return out;
}

std::optional<ChatTemplate> resolve_chat_template(const std::filesystem::path& model_dir,
                                                  std::string_view override_name) {
  std::optional<ChatFamily> wanted;
  if (!override_name.empty()) wanted = parse_chat_family(override_name);
  std::string source;
  const std::string jinja = read_chat_template_string(model_dir, &source);
  std::optional<ChatTemplate> detected;
  if (!jinja.empty()) {
    try {
      detected = detect_chat_template(jinja);
    } catch (const InputError& e) {
      if (!wanted) {
        std::string_view what = e.what();
        if (const size_t end = what.find("] "); what.starts_with("[") && end != std::string_view::npos) {
          what.remove_prefix(end + 2);
        }
        throw InputError(kChatTemplateComponent, fmt::format("{}: {}", source, what));
      }
    }
    if (!detected && !wanted) {
      throw InputError(kChatTemplateComponent,
                       fmt::format("{}: the chat template is none of the families flotilla renders (llama2, "
                                   "llama3, mistral, chatml); pass --chat-template NAME if the model uses "
                                   "one of them",
                                   source));
    }
  }
  if (!wanted) return detected;
  if (detected && detected->family == *wanted) return detected;
  ChatTemplate t;
  t.family = *wanted;
  return t;
}

std::vector<Segment> render_chat(const ChatTemplate& tmpl, std::span<const Message> messages) {
  bool has_turn = false;
  for (const Message& m : messages) has_turn = has_turn || m.role != Role::system;
  if (!has_turn) throw ConversationError("the conversation has no user or assistant message");
  std::vector<Segment> out;
  switch (tmpl.family) {
    case ChatFamily::llama3: render_llama3(tmpl, messages, out); break;
    case ChatFamily::chatml: render_chatml(tmpl, messages, out); break;
    case ChatFamily::llama2: render_llama2(tmpl, messages, out); break;
    case ChatFamily::mistral: render_mistral(tmpl, messages, out); break;
  }
  return out;
}

std::string segments_text(std::span<const Segment> segments) {
  std::string out;
  for (const Segment& s : segments) {
    if (s.token < 0) out += s.text;
  }
  return out;
}

}  // namespace flotilla::data
