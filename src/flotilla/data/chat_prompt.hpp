// What `generate` and `chat` send to a model: a conversation rendered by the model's own
// chat template (tokenizer_config.json's Jinja, run by data/jinja), ending with the
// generation prompt (the assistant's header), and the text that ends the assistant's turn.
//
// A template the Jinja subset cannot run still works when it is one of the four families
// chat_template.hpp renders in C++ (the family renderer is used instead); --chat-template
// NAME picks a family outright.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "flotilla/data/chat_template.hpp"
#include "flotilla/data/jinja.hpp"
#include "flotilla/data/jsonl_examples.hpp"

namespace flotilla::data {

class ChatPrompter {
 public:
  // The model's chat template; `override_name` ("llama3", ...) forces a built-in family.
  // nullopt when the model has none and no override is given. InputError naming the file
  // and the construct when the template is neither runnable nor of a known family.
  static std::optional<ChatPrompter> for_model(const std::filesystem::path& model_dir,
                                               std::string_view override_name);
  // A template given as text (tests): bos/eos are what the template's bos_token/eos_token say.
  static ChatPrompter from_jinja(std::string_view jinja, std::string bos_token, std::string eos_token);
  static ChatPrompter from_family(ChatTemplate family);

  // The prompt text: special tokens appear as text (the tokenizer turns them into ids) and
  // BOS is included when the template writes it. InputError when the template refuses the
  // conversation (its raise_exception message) or fails on it.
  std::string render(std::span<const Message> messages, bool add_generation_prompt) const;
  // The text that closes an assistant turn ("<|im_end|>", "<|eot_id|>", "</s>"), found by
  // rendering a probe conversation; "" when the template writes nothing after the answer.
  const std::string& end_of_turn() const { return end_of_turn_; }
  // "jinja (tokenizer_config.json)" or the family, for --verbose.
  const std::string& describe() const { return description_; }

 private:
  ChatPrompter() = default;
  void find_end_of_turn();

  std::shared_ptr<const jinja::Template> jinja_;  // set: the model's own template runs
  std::optional<ChatTemplate> family_;            // else this built-in family renders
  std::string bos_token_, eos_token_;
  std::string end_of_turn_;
  std::string description_;
};

}  // namespace flotilla::data
