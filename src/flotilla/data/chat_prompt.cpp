#include "flotilla/data/chat_prompt.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/file.hpp"
#include "flotilla/base/log.hpp"

namespace flotilla::data {
namespace {

constexpr const char* kChatPromptComponent = "data/chat";

// tokenizer_config.json's bos_token / eos_token: "<s>", {"content": "<s>", ...} or absent.
std::string special_token(const std::filesystem::path& model_dir, const char* key) {
  const auto path = model_dir / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return "";
  const nlohmann::json j = nlohmann::json::parse(read_text_file(path), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains(key)) return "";
  const nlohmann::json& t = j[key];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_object() && t.contains("content") && t["content"].is_string()) return t["content"].get<std::string>();
  return "";
}

// The generation prompt each family's template writes after the conversation.
std::string family_generation_prompt(ChatFamily family) {
  switch (family) {
    case ChatFamily::llama3: return "<|start_header_id|>assistant<|end_header_id|>\n\n";
    case ChatFamily::chatml: return "<|im_start|>assistant\n";
    case ChatFamily::llama2:
    case ChatFamily::mistral: return "";  // the prompt ends with [/INST]
  }
  return "";
}

// Strips the "[component] " an Error's what() starts with, to re-wrap the reason.
std::string_view reason_of(const std::exception& e) {
  std::string_view what = e.what();
  if (const size_t end = what.find("] "); what.starts_with("[") && end != std::string_view::npos)
    what.remove_prefix(end + 2);
  return what;
}

}  // namespace

ChatPrompter ChatPrompter::from_jinja(std::string_view jinja, std::string bos_token, std::string eos_token) {
  ChatPrompter p;
  p.jinja_ = std::make_shared<const jinja::Template>(jinja);
  p.bos_token_ = std::move(bos_token);
  p.eos_token_ = std::move(eos_token);
  p.description_ = "the model's chat template";
  p.find_end_of_turn();
  return p;
}

ChatPrompter ChatPrompter::from_family(ChatTemplate family) {
  ChatPrompter p;
  p.description_ = "the built-in " + family.describe() + " chat template";
  p.family_ = std::move(family);
  p.find_end_of_turn();
  return p;
}

std::optional<ChatPrompter> ChatPrompter::for_model(const std::filesystem::path& model_dir,
                                                    std::string_view override_name) {
  if (!override_name.empty()) {
    auto family = resolve_chat_template(model_dir, override_name);
    return from_family(*family);
  }
  const ChatTemplateSource source = read_chat_template_source(model_dir);
  if (source.jinja.empty()) return std::nullopt;
  try {
    ChatPrompter p = from_jinja(source.jinja, special_token(model_dir, "bos_token"),
                                special_token(model_dir, "eos_token"));
    p.description_ = "the chat template of " + source.file;
    return p;
  } catch (const InputError& e) {
    // A template past the Jinja subset may still be one of the families rendered in C++.
    std::optional<ChatTemplate> family;
    try {
      family = detect_chat_template(source.jinja);
    } catch (const InputError&) {
    }
    if (!family) throw InputError(kChatPromptComponent, fmt::format("{}: {}", source.file, reason_of(e)));
    log::info("{}: {}; rendering it as the built-in {} family", source.file, reason_of(e), family->describe());
    return from_family(*family);
  }
}

std::string ChatPrompter::render(std::span<const Message> messages, bool add_generation_prompt) const {
  if (family_) {
    std::string text = segments_text(render_chat(*family_, messages));
    if (add_generation_prompt) text += family_generation_prompt(family_->family);
    return text;
  }
  jinja::List list;
  for (const Message& m : messages)
    list.emplace_back(jinja::Dict{{"role", jinja::Value(std::string(role_name(m.role)))},
                                  {"content", jinja::Value(m.content)}});
  const jinja::Dict globals = {{"messages", jinja::Value(std::move(list))},
                               {"bos_token", jinja::Value(bos_token_)},
                               {"eos_token", jinja::Value(eos_token_)},
                               {"add_generation_prompt", jinja::Value(add_generation_prompt)}};
  return jinja_->render(globals);
}

// Renders user/assistant with a sentinel answer: what follows the sentinel up to the
// first whitespace is the end of turn ("<|im_end|>\n" -> "<|im_end|>", " </s>" -> "</s>").
void ChatPrompter::find_end_of_turn() {
  constexpr std::string_view kSentinel = "FLOTILLA_END_OF_TURN_PROBE";
  const Message probe[] = {{Role::user, "hello"}, {Role::assistant, std::string(kSentinel)}};
  const std::string text = render(probe, false);
  const size_t at = text.rfind(kSentinel);
  if (at == std::string::npos) return;
  const std::string_view after = python_strip(std::string_view(text).substr(at + kSentinel.size()));
  end_of_turn_ = std::string(after.substr(0, after.find_first_of(" \t\r\n")));
}

}  // namespace flotilla::data
