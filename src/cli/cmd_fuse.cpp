// flotilla fuse: merge LoRA adapters into the base and write a Hugging Face model directory.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::cli {

void add_fuse_command(CLI::App& app) {
  struct Options {
    std::string model, adapter, out;
    bool force = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("fuse", "Merge LoRA adapters into the base model (W += alpha/r * B A)");
  cmd->add_option("--model", opt->model, "Base model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--adapter", opt->adapter, "PEFT adapter directory (adapter_model.safetensors + adapter_config.json)")
      ->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--out", opt->out, "Output model directory")->required();
  cmd->add_flag("--force", opt->force, "Write into a non-empty directory");
  cmd->callback([opt] {
    model::Llama model = model::Llama::load(opt->model);
    const model::LoraAdapters adapters = model::LoraAdapters::load_peft(opt->adapter, model.config());
    const auto tokenizer = text::Tokenizer::load_for_model(opt->model);
    ensure_output_dir(opt->out, opt->force);
    adapters.merge_into(model.params(), model.layout());
    model.save(opt->out);
    tokenizer->save(opt->out);
    fmt::print("fused {} adapted layers (rank {}, {}) into {}\n", model.config().n_layers - adapters.first_layer(),
               adapters.config().rank, opt->adapter, opt->out);
  });
}

}  // namespace flotilla::cli
