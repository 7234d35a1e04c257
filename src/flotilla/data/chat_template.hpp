// Chat templates: a conversation becomes the exact text the model's own Jinja template
// (tokenizer_config.json "chat_template") renders, cut into *segments* that say whether
// their tokens are *trainable* (the assistant's words, which mask_prompt keeps in the loss)
// or context (system, user, headers).
//
// flotilla does not run Jinja: it recognises four families by distinctive markers in the
// template string and renders them in C++. Special tokens (<|eot_id|>, <|im_end|>, <s>, ...)
// are written as text; the tokenizer's added-token matching turns them into ids. BOS is the
// template's own BOS text, so nothing else adds one.
//
//   family   marker                      one turn each of system S, user U, assistant A
//   llama3   <|start_header_id|>         <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>
//                                        <|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>
//                                        <|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>
//   chatml   <|im_start|>                <|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n
//                                        <|im_start|>assistant\nA<|im_end|>\n
//   llama2   [INST] and <<SYS>>          <s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>
//   mistral  [INST] without <<SYS>>      <s>[INST] S\n\nU[/INST] A</s>      (Mistral v0.3)
//
// The exact rules of each (trimming, where the system message goes, role order) are in
// chat_template.cpp beside the Jinja they reproduce.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/data/jsonl_examples.hpp"

namespace flotilla::data {

enum class ChatFamily { llama2, llama3, mistral, chatml };
std::string_view chat_family_name(ChatFamily family);
// "llama2" | "llama3" | "mistral" | "chatml"; InputError listing the names otherwise.
ChatFamily parse_chat_family(std::string_view name);

struct ChatTemplate {
  ChatFamily family = ChatFamily::chatml;
  // The system message a template inserts when a conversation has none (Qwen2's
  // "You are a helpful assistant."; Llama 3.1's empty one, which still renders its header).
  std::optional<std::string> default_system;
  // Text a template puts before every system message's content (Llama 3.1's
  // "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n").
  std::string system_prefix;

  // "llama3", or "chatml (default system: ...)" for logs and index.json.
  std::string describe() const;
};

// The family of a Jinja chat_template string, from its markers (see the table above);
// default_system and system_prefix are filled where the template writes them as literals.
// nullopt when no marker matches. A Mistral v0.1/v0.2 template ("[INST] U [/INST]", spaces
// on both sides) renders differently from v0.3: InputError naming --chat-template mistral.
std::optional<ChatTemplate> detect_chat_template(std::string_view jinja);

// The chat template of a model directory: tokenizer_config.json's "chat_template" (a string,
// or a list of {"name", "template"} where "default" is used), else chat_template.jinja.
// `override_name` (--chat-template) wins over detection; when it names the detected family,
// the detected details are kept. nullopt when there is no template and no override.
// InputError naming the file if tokenizer_config.json is unreadable, or its template is
// present but of no known family (and no override was given).
std::optional<ChatTemplate> resolve_chat_template(const std::filesystem::path& model_dir,
                                                  std::string_view override_name);

// The Jinja text of a model directory's chat template (as resolve_chat_template finds it)
// and the file it came from; empty text when there is none.
struct ChatTemplateSource {
  std::string jinja;
  std::string file;
};
ChatTemplateSource read_chat_template_source(const std::filesystem::path& model_dir);

// A piece of a rendered example. Either text (encoded by the tokenizer) or one token id
// placed as is (BOS/EOS of the formats that have no template).
struct Segment {
  std::string text;
  int32_t token = -1;      // >= 0: this id instead of text
  bool trainable = false;  // mask_prompt keeps these tokens in the loss
};

// Thrown by render_chat for a conversation the template cannot render; `reason()` is the
// message without the component, for the JSONL reader's "<file>:<line>: ..." error.
class ConversationError : public InputError {
 public:
  explicit ConversationError(std::string reason)
      : InputError("data/chat", reason), reason_(std::move(reason)) {}
  const std::string& reason() const noexcept { return reason_; }

 private:
  std::string reason_;
};

// Renders a conversation the way the family's template does. Assistant turns are
// trainable from their first content character through their end-of-turn marker
// (<|eot_id|>, <|im_end|>, </s>); the header before them is not (it is the generation
// prompt). ConversationError for an empty conversation, and for llama2/mistral when roles
// do not alternate user/assistant after an optional first system message.
std::vector<Segment> render_chat(const ChatTemplate& tmpl, std::span<const Message> messages);

// Concatenated text of the segments (token segments are skipped): what the Jinja renders.
std::string segments_text(std::span<const Segment> segments);

// Python's str.strip() (Jinja's trim filter and .strip()): removes leading and trailing
// characters for which str.isspace() is true, Unicode ones included.
std::string_view python_strip(std::string_view text);

}  // namespace flotilla::data
