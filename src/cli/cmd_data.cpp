// flotilla data prepare: JSONL examples (text, prompt/completion, chat) -> token shards,
// encoded with a model's tokenizer and chat template.
#include <fmt/format.h>

#include <cstdio>

#include "cli/commands.hpp"
#include "flotilla/data/prepare.hpp"

namespace flotilla::cli {

void add_data_command(CLI::App& app) {
  struct Options {
    std::string model, data, out, split, chat_template;
    bool mask_prompt = false, skip_invalid = false, force = false;
    size_t max_seq_len = 0;
    uint64_t seed = 0;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* data = app.add_subcommand("data", "Prepare training data");
  data->require_subcommand(1);
  CLI::App* cmd = data->add_subcommand(
      "prepare", "Tokenize JSONL examples ({\"text\"}, {\"prompt\",\"completion\"}, {\"messages\"}) into token shards");
  cmd->add_option("--model", opt->model, "Model directory: its tokenizer and tokenizer_config.json's chat template")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--data", opt->data, "A folder with train.jsonl [valid.jsonl test.jsonl], or one .jsonl file with --split")
      ->required();
  cmd->add_option("--out", opt->out, "Output folder (written as OUT.tmp, then renamed)")->required();
  cmd->add_option("--split", opt->split, "For one file: train,valid,test fractions, e.g. 0.9,0.05,0.05");
  cmd->add_option("--chat-template", opt->chat_template,
                  "llama2|llama3|mistral|chatml (default: detected from the model's chat_template)");
  cmd->add_flag("--mask-prompt", opt->mask_prompt, "Loss only on completions and assistant turns");
  cmd->add_option("--max-seq-len", opt->max_seq_len, "Truncate examples to this many tokens (0: no limit)");
  cmd->add_flag("--skip-invalid", opt->skip_invalid, "Skip and count invalid lines instead of stopping at the first");
  cmd->add_option("--seed", opt->seed, "Seed of the shuffle before --split");
  cmd->add_flag("--force", opt->force, "Replace a non-empty output folder");
  cmd->callback([opt] {
    // --force replaces OUT whole: never with the data or the model it reads inside.
    check_output_not_input("--out", opt->out, {{"--data", opt->data}, {"--model", opt->model}});
    data::PrepareOptions o;
    o.data = opt->data;
    o.out = opt->out;
    if (!opt->split.empty()) o.split = data::parse_split_fractions(opt->split);
    o.mask_prompt = opt->mask_prompt;
    o.max_seq_len = opt->max_seq_len;
    o.skip_invalid = opt->skip_invalid;
    o.seed = opt->seed;
    o.force = opt->force;
    const data::DatasetIndex index = data::prepare_for_model(opt->model, opt->chat_template, o);
    std::fputs(data::format_prepare_summary(index).c_str(), stdout);
    std::printf("\nwrote %s\n", opt->out.c_str());
  });
}

}  // namespace flotilla::cli
