// flotilla generate: sample a continuation of a prompt with the KV cache.
#include <fmt/format.h>

#include <cstdio>
#include <iostream>
#include <iterator>
#include <optional>

#include "cli/commands.hpp"
#include "cli/generation.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/data/chat_prompt.hpp"
#include "flotilla/model/sampling.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::cli {

void add_generate_command(CLI::App& app) {
  struct Options {
    std::string dtype = "float32";
    std::string model, prompt, adapter, system_prompt, chat_template;
    std::vector<std::string> stops;
    int64_t max_tokens = 128;
    bool no_bos = false, strict = false;
    bool ignore_chat_template = false;
    bool verbose = false;
    model::SamplingParams sampling;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a prompt");
  cmd->add_option("--model", opt->model, "Model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt,-p", opt->prompt,
                  "Prompt text, sent as a user message through the model's chat template when it has one; "
                  "'-' reads it from stdin");
  cmd->add_option("--adapter,--adapter-path", opt->adapter, "A LoRA adapter folder to apply (PEFT or mlx_lm layout)")->check(CLI::ExistingDirectory);
  cmd->add_option("--max-tokens,-m", opt->max_tokens, "Tokens to generate at most")->capture_default_str();
  cmd->add_option("--temperature,--temp", opt->sampling.temperature, "0: greedy")->capture_default_str();
  cmd->add_option("--top-k", opt->sampling.top_k, "Sample among the k likeliest (0: all)")->capture_default_str();
  cmd->add_option("--top-p", opt->sampling.top_p, "Nucleus sampling mass (1: all)")->capture_default_str();
  cmd->add_option("--seed", opt->sampling.seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("--no-bos", opt->no_bos, "Do not prepend the BOS token");
  add_strict_flag(cmd, opt->strict);
  add_dtype_option(cmd, opt->dtype);
  cmd->add_option("--stop", opt->stops,
                  "End at this text (not printed), e.g. a chat template's end of turn '<|im_end|>'; repeatable");
  cmd->add_option("--system-prompt", opt->system_prompt, "A system message before the prompt (chat template only)");
  cmd->add_flag("--ignore-chat-template", opt->ignore_chat_template,
                "Send the prompt as raw text, without the model's chat template");
  cmd->add_option("--chat-template", opt->chat_template,
                  "Use this built-in chat template instead of the model's: llama2, llama3, mistral, chatml");
  cmd->add_flag("--verbose", opt->verbose,
                "Also print the prompt as the model sees it (before the answer) and the speed (on stderr)");
  cmd->callback([opt] {
    if (opt->max_tokens <= 0) throw InputError("generate", "--max-tokens must be positive");
    if (opt->prompt == "-") opt->prompt.assign(std::istreambuf_iterator<char>(std::cin), {});
    // The model's chat template, unless raw text is asked for: a chat model answers its own
    // format, and stops at its end of turn.
    std::optional<data::ChatPrompter> chat;
    if (!opt->ignore_chat_template) chat = data::ChatPrompter::for_model(opt->model, opt->chat_template);
    if (!chat && !opt->system_prompt.empty())
      throw InputError("generate", opt->ignore_chat_template
                                       ? "--system-prompt needs the chat template (drop --ignore-chat-template)"
                                       : "--system-prompt needs a chat template, and the model has none "
                                         "(give --chat-template NAME)");
    std::string prompt_text = opt->prompt;
    if (chat) {
      std::vector<data::Message> messages;
      if (!opt->system_prompt.empty()) messages.push_back({data::Role::system, opt->system_prompt});
      messages.push_back({data::Role::user, opt->prompt});
      prompt_text = chat->render(messages, /*add_generation_prompt=*/true);
      if (!chat->end_of_turn().empty()) opt->stops.push_back(chat->end_of_turn());
    }
    model::Sampler sampler(opt->sampling);  // refuses sampling parameters outside their domain before loading
    const LoadedModel loaded = load_for_generation(opt->model, opt->adapter, opt->strict, opt->dtype);
    const text::Tokenizer& tokenizer = *loaded.tokenizer;
    std::vector<int32_t> prompt;
    // A chat template writes BOS itself where the model wants one.
    if (!chat && !opt->no_bos && tokenizer.bos_id() >= 0) prompt.push_back(tokenizer.bos_id());
    const std::vector<int32_t> body = tokenizer.encode(prompt_text);
    prompt.insert(prompt.end(), body.begin(), body.end());
    if (opt->verbose) {
      if (chat) std::fprintf(stderr, "prompt, with %s:\n", chat->describe().c_str());
      fmt::print("{}", prompt_text);
      std::fflush(stdout);
    }
    AnswerStats stats;
    generate_answer(
        loaded, prompt, opt->max_tokens, sampler, opt->stops,
        [](const std::string& piece) {
          fmt::print("{}", piece);
          std::fflush(stdout);
        },
        &stats);
    fmt::print("\n");
    if (opt->verbose)
      std::fprintf(stderr, "prompt %ld tokens in %.3fs (%.1f tokens/s); generated %ld tokens in %.3fs (%.1f tokens/s)\n",
                   static_cast<long>(stats.prompt_tokens), stats.prefill_s,
                   static_cast<double>(stats.prompt_tokens) / stats.prefill_s, static_cast<long>(stats.generated_tokens),
                   stats.decode_s, static_cast<double>(stats.generated_tokens) / stats.decode_s);
  });
}

}  // namespace flotilla::cli
