// flotilla init: a randomly initialised model of a preset or any HF config.json.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/text/byte_tokenizer.hpp"

namespace flotilla::cli {

void add_init_command(CLI::App& app) {
  struct Options {
    std::string preset, config, out, dtype;
    uint64_t seed = 0;
    int bits = 0;
    int64_t group_size = 64;
    bool force = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("init", "Write a randomly initialised model (preset or HF config.json)");
  auto* preset = cmd->add_option("--preset", opt->preset, "tiny, 15M or 110M");
  auto* config = cmd->add_option("--config", opt->config, "A Hugging Face config.json (llama, mistral, qwen2)")
                     ->check(CLI::ExistingFile);
  preset->excludes(config);
  cmd->add_option("--out", opt->out, "Output model directory")->required();
  cmd->add_option("--seed", opt->seed, "Initialisation seed");
  cmd->add_flag("--force", opt->force, "Write into a non-empty directory");
  cmd->add_option("--dtype", opt->dtype, "float32 (default), float16 or bfloat16; written tensor by tensor, so models "
                                         "larger than memory can be made");
  cmd->add_option("--quantize,-q", opt->bits, "Write the model quantized to 2, 4 or 8 bits (MLX layout), tensor by tensor");
  cmd->add_option("--group-size", opt->group_size, "Quantization group size")->capture_default_str();
  cmd->callback([opt] {
    if (opt->preset.empty() && opt->config.empty()) throw InputError("init", "give --preset or --config");
    check_output_not_input("--out", opt->out, {{"--config", opt->config}});
    model::ModelConfig cfg =
        opt->config.empty() ? model::preset_config(opt->preset) : model::ModelConfig::load(opt->config);
    ensure_output_dir(opt->out, opt->force);
    // The byte tokenizer goes with the model when it fits the vocabulary (real tokenizers
    // come with real models); a new model then speaks its special ids.
    const text::ByteTokenizer tokenizer;
    const bool with_tokenizer = cfg.vocab_size >= tokenizer.vocab_size();
    if (with_tokenizer && cfg.bos_token_id < 0) cfg.bos_token_id = tokenizer.bos_id();
    if (with_tokenizer && cfg.eos_token_id < 0) cfg.eos_token_id = tokenizer.eos_id();
    if (!opt->dtype.empty() || opt->bits != 0) {
      // Streaming: one tensor in memory at a time, the same values as init_random.
      model::ModelWriteOptions options;
      if (opt->bits != 0) options.quantize = QuantFormat{opt->bits, opt->group_size};
      options.dtype = !opt->dtype.empty() ? model::parse_model_dtype(opt->dtype) : DType::f16;
      if (options.quantize) {
        const model::QuantizationPlan plan = model::plan_quantization(cfg, *options.quantize);
        if (!plan.left_float.empty())
          fmt::print("left float, as group size {} does not divide their {}\n",
                     options.quantize->group_size, model::describe_left_float(plan));
      }
      write_output_dir(opt->out, true, [&](const std::filesystem::path& stage) {
        model::write_model(stage, cfg, options, model::random_init_source(cfg, opt->seed));
        if (with_tokenizer) tokenizer.save(stage);
      });
    } else {
      model::Llama model(cfg);
      model.init_random(opt->seed);
      model.save(opt->out);
      if (with_tokenizer) tokenizer.save(opt->out);
    }
    fmt::print("wrote {} ({} model, {:.2f}M parameters)\n", opt->out, model::architecture_name(cfg.arch),
               static_cast<double>(cfg.num_params()) / 1e6);
  });
}

}  // namespace flotilla::cli
