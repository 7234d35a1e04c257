// flotilla fuse: merge LoRA adapters into the base and write a Hugging Face model directory.
// A quantized base is merged tensor by tensor (dequantize, add scale * B A, then quantize
// again in the base's format, or write float with --de-quantize), never whole in float.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/model/vocab_check.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::cli {

void add_fuse_command(CLI::App& app) {
  struct Options {
    std::string model, adapter, out, dtype;
    bool force = false;
    bool de_quantize = false;
    bool strict = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("fuse", "Merge LoRA adapters into the base model (W += alpha/r * B A)");
  cmd->add_option("--model", opt->model, "Base model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--adapter,--adapter-path", opt->adapter,
                  "LoRA adapter folder: PEFT (adapter_model.safetensors + adapter_config.json) or mlx_lm "
                  "(adapters.safetensors + adapter_config.json)")
      ->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--out,--save-path", opt->out, "Output model directory")->required();
  cmd->add_flag("--force", opt->force, "Write into a non-empty directory");
  cmd->add_flag("--de-quantize,--dequantize", opt->de_quantize, "Write a float model from a quantized base");
  add_strict_flag(cmd, opt->strict);
  cmd->add_option("--dtype", opt->dtype, "float32, float16 or bfloat16 for a quantized base's output "
                                         "(default: float32 with --de-quantize, else the base's scale dtype)");
  cmd->callback([opt] {
    check_output_not_input("--out", opt->out, {{"--model", opt->model}, {"--adapter", opt->adapter}});
    check_output_dir(opt->out, opt->force);
    model::Llama model = model::Llama::load(opt->model, non_finite_policy(opt->strict));
    const model::LoraAdapters adapters =
        model::LoraAdapters::load(opt->adapter, model.config(), non_finite_policy(opt->strict));
    const auto tokenizer = text::Tokenizer::load_for_model(opt->model);
    model::check_tokenizer_fits(*tokenizer, model.config(), opt->model);
    if (!model.quantized()) {
      ensure_output_dir(opt->out, opt->force);
      adapters.merge_into(model.params(), model.layout());
      model.save(opt->out);
      tokenizer->save(opt->out);
    } else {
      model::ModelWriteOptions options;
      const QuantMatrix& any = model.quantized_weight(model::WeightRef::quantized(0));  // the first
      if (!opt->de_quantize) {
        options.quantize = any.format;
        // The weights the base holds quantized, and only they: a mixed base stays mixed.
        options.quantized_weights.emplace();
        for (const model::ParamInfo& info : model.layout().params())
          if (info.quantized) options.quantized_weights->insert(info.name);
      }
      options.dtype = !opt->dtype.empty() ? model::parse_model_dtype(opt->dtype)
                      : opt->de_quantize  ? DType::f32
                                          : any.scale_dtype;
      const model::WeightSource source = [&](const model::ParamInfo& info, std::span<float> out) {
        model.weight_f32(*model.layout().find(info.name), out);
        adapters.merge_into_tensor(info.name, out);
      };
      write_output_dir(opt->out, opt->force, [&](const std::filesystem::path& stage) {
        model::write_model(stage, model.config(), options, source);
        tokenizer->save(stage);
      });
    }
    fmt::print("fused {} adapted layers (rank {}, {}) into {}{}\n", model.config().n_layers - adapters.first_layer(),
               adapters.config().rank, opt->adapter, opt->out,
               model.quantized() ? (opt->de_quantize ? " (de-quantized)" : " (quantized again)") : "");
  });
}

}  // namespace flotilla::cli
