// flotilla score: per-token log-probabilities of a text under a model, as JSON — to check
// a converted model against another implementation.
#include <fmt/format.h>

#include <cmath>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/vocab_check.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::cli {
namespace {
std::vector<int32_t> parse_token_list(const std::string& list) {
  std::vector<int32_t> ids;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long value = 0;
    try {
      value = std::stol(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size() || value < INT32_MIN || value > INT32_MAX)
      throw InputError("score", fmt::format("--tokens: '{}' is not a token id", item));
    ids.push_back(static_cast<int32_t>(value));
  }
  return ids;
}
}  // namespace

void add_score_command(CLI::App& app) {
  struct Options {
    std::string model, text, tokens, adapter;
    std::string dtype = "float32";
    bool no_bos = false, strict = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("score", "Print each token's log-probability under the model, as JSON");
  cmd->add_option("--model", opt->model, "Model directory")->required()->check(CLI::ExistingDirectory);
  auto* text = cmd->add_option("--text", opt->text, "Text to score (encoded with the model's tokenizer, BOS first)");
  auto* tokens = cmd->add_option("--tokens", opt->tokens, "Token ids to score, comma-separated: 1,2,3");
  text->excludes(tokens);
  cmd->add_flag("--no-bos", opt->no_bos, "With --text: do not prepend BOS");
  cmd->add_option("--adapter,--adapter-path", opt->adapter, "A LoRA adapter folder to apply (PEFT or mlx_lm layout)")
      ->check(CLI::ExistingDirectory);
  add_strict_flag(cmd, opt->strict);
  add_dtype_option(cmd, opt->dtype);
  cmd->callback([opt] {
    if (opt->text.empty() == opt->tokens.empty()) throw InputError("score", "give --text or --tokens");
    model::Llama model = model::Llama::load(opt->model, non_finite_policy(opt->strict));
    model.set_matmul_input(matmul_dtype_of(opt->dtype));
    // Attached rather than merged, so a quantized base scores with its adapter too; forward
    // outside training applies no dropout.
    std::optional<model::LoraAdapters> adapters;
    if (!opt->adapter.empty()) {
      adapters.emplace(model::LoraAdapters::load(opt->adapter, model.config(), non_finite_policy(opt->strict)));
      model.attach_lora(&*adapters);
      model.set_training(false);
    }
    std::vector<int32_t> ids;
    if (!opt->tokens.empty()) {
      ids = parse_token_list(opt->tokens);
    } else {
      const auto tokenizer = text::Tokenizer::load_for_model(opt->model);
      model::check_tokenizer_fits(*tokenizer, model.config(), opt->model);
      if (!opt->no_bos && tokenizer->bos_id() >= 0) ids.push_back(tokenizer->bos_id());
      const auto body = tokenizer->encode(opt->text);
      ids.insert(ids.end(), body.begin(), body.end());
    }
    if (ids.size() < 2) throw InputError("score", "need at least two tokens (the first is only context)");
    if (static_cast<int64_t>(ids.size()) > model.config().max_position)
      throw InputError("score", fmt::format("{} tokens exceed the model's context of {}", ids.size(),
                                            model.config().max_position));
    // Token i (i >= 1) is scored given tokens 0..i-1: inputs ids[0..n-2], targets ids[1..n-1].
    const auto T = static_cast<int64_t>(ids.size()) - 1;
    std::vector<int32_t> inputs(ids.begin(), ids.end() - 1), targets(ids.begin() + 1, ids.end());
    model.forward(inputs.data(), targets.data(), 1, T);
    const std::span<const float> losses = model.token_losses();
    nlohmann::json logprobs = nlohmann::json::array();
    double total = 0.0;
    for (int64_t i = 0; i < T; ++i) {
      logprobs.push_back(-static_cast<double>(losses[static_cast<size_t>(i)]));
      total -= losses[static_cast<size_t>(i)];
    }
    const nlohmann::json out = {{"tokens", ids},
                                {"logprobs", logprobs},
                                {"total_logprob", total},
                                {"mean_logprob", total / static_cast<double>(T)},
                                {"perplexity", std::exp(-total / static_cast<double>(T))},
                                {"note", "logprobs[i] is log p(tokens[i+1] | tokens[0..i])"}};
    fmt::print("{}\n", out.dump(2));
  });
}

}  // namespace flotilla::cli
