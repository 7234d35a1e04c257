// flotilla chat: a conversation with a model through its chat template. Each line read from
// stdin is a user turn; the answer is printed as it is generated and joins the conversation,
// which is sent whole (system prompt included) for the next turn. Ends at EOF. Works from
// a terminal or a pipe, as mlx_lm.chat does from a terminal.
#include <fmt/format.h>

#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>

#include "cli/commands.hpp"
#include "cli/generation.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/data/chat_prompt.hpp"

namespace flotilla::cli {
namespace {

// The conversation as the template renders it, with the assistant's header opened.
std::vector<int32_t> encode_conversation(const data::ChatPrompter& chat, const text::Tokenizer& tokenizer,
                                         const std::vector<data::Message>& messages) {
  return tokenizer.encode(chat.render(messages, /*add_generation_prompt=*/true));
}

}  // namespace

void add_chat_command(CLI::App& app) {
  struct Options {
    std::string dtype = "float32";
    std::string model, adapter, system_prompt, chat_template;
    int64_t max_tokens = 256;
    bool strict = false;
    model::SamplingParams sampling;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "chat", "Talk with a model through its chat template: each line on stdin is a turn, until EOF (Ctrl-D)");
  cmd->add_option("--model", opt->model, "Model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--adapter,--adapter-path", opt->adapter, "A LoRA adapter folder to apply (PEFT or mlx_lm layout)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--system-prompt", opt->system_prompt, "A system message that opens the conversation");
  cmd->add_option("--chat-template", opt->chat_template,
                  "Use this built-in chat template instead of the model's: llama2, llama3, mistral, chatml");
  cmd->add_option("--max-tokens,-m", opt->max_tokens, "Tokens per answer at most")->capture_default_str();
  cmd->add_option("--temperature,--temp", opt->sampling.temperature, "0: greedy")->capture_default_str();
  cmd->add_option("--top-k", opt->sampling.top_k, "Sample among the k likeliest (0: all)")->capture_default_str();
  cmd->add_option("--top-p", opt->sampling.top_p, "Nucleus sampling mass (1: all)")->capture_default_str();
  cmd->add_option("--seed", opt->sampling.seed, "Sampling seed")->capture_default_str();
  add_strict_flag(cmd, opt->strict);
  add_dtype_option(cmd, opt->dtype);
  cmd->callback([opt] {
    if (opt->max_tokens <= 0) throw InputError("chat", "--max-tokens must be positive");
    const std::optional<data::ChatPrompter> chat = data::ChatPrompter::for_model(opt->model, opt->chat_template);
    if (!chat)
      throw InputError("chat", opt->model + ": the model has no chat template (tokenizer_config.json's "
                                            "chat_template): give --chat-template NAME, or use generate");
    model::Sampler sampler(opt->sampling);  // refuses sampling parameters outside their domain before loading
    const LoadedModel loaded = load_for_generation(opt->model, opt->adapter, opt->strict, opt->dtype);
    std::vector<std::string> stops;
    if (!chat->end_of_turn().empty()) stops.push_back(chat->end_of_turn());

    std::vector<data::Message> messages;
    if (!opt->system_prompt.empty()) messages.push_back({data::Role::system, opt->system_prompt});
    const size_t first_turn = messages.size();
    const bool terminal = ::isatty(STDIN_FILENO) != 0;
    const int64_t context = loaded.model.config().max_position;
    if (terminal) std::fprintf(stderr, "chatting with %s (%s); Ctrl-D ends\n", opt->model.c_str(), chat->describe().c_str());
    std::string line;
    while (true) {
      if (terminal) {
        std::fputs(">> ", stdout);
        std::fflush(stdout);
      }
      if (!std::getline(std::cin, line)) break;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      messages.push_back({data::Role::user, line});
      std::vector<int32_t> prompt = encode_conversation(*chat, *loaded.tokenizer, messages);
      // A long conversation forgets its oldest exchanges (the system prompt stays) so that
      // the newest turn and an answer fit the model's context.
      while (static_cast<int64_t>(prompt.size()) + 1 >= context && messages.size() - first_turn > 1) {
        messages.erase(messages.begin() + static_cast<std::ptrdiff_t>(first_turn),
                       messages.begin() + static_cast<std::ptrdiff_t>(first_turn + 2));
        std::fprintf(stderr, "chat: the conversation outgrew the model's context of %ld tokens: forgot the oldest "
                     "exchange\n", static_cast<long>(context));
        prompt = encode_conversation(*chat, *loaded.tokenizer, messages);
      }
      const std::string answer = generate_answer(loaded, prompt, opt->max_tokens, sampler, stops,
                                                 [](const std::string& piece) {
                                                   fmt::print("{}", piece);
                                                   std::fflush(stdout);
                                                 });
      fmt::print("\n");
      std::fflush(stdout);
      messages.push_back({data::Role::assistant, answer});
    }
    if (terminal) fmt::print("\n");
  });
}

}  // namespace flotilla::cli
