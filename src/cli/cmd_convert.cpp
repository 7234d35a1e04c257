// flotilla convert: rewrite a model directory tensor by tensor — quantized in MLX's layout
// (--quantize), de-quantized, or in another float dtype. Peak memory is one tensor.
// With --checkpoint: consolidate a training checkpoint (any number of ranks, any ZeRO
// stage, sharded or not) into a Hugging Face model directory, or a LoRA run's into a PEFT
// adapter directory.
#include <fmt/format.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/io/tensor_store.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "flotilla/train/checkpoint.hpp"
#include "flotilla/train/sharded_checkpoint.hpp"

namespace flotilla::cli {

void copy_tokenizer_files(const std::filesystem::path& model_dir, const std::filesystem::path& out) {
  for (const char* name : {text::kFlotillaTokenizerFile, "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                           "special_tokens_map.json", "added_tokens.json", "generation_config.json", "vocab.json",
                           "merges.txt"}) {
    if (std::filesystem::is_regular_file(model_dir / name))
      std::filesystem::copy_file(model_dir / name, out / name, std::filesystem::copy_options::overwrite_existing);
  }
}

namespace {

constexpr const char* kAdapterFiles[] = {"adapter_model.safetensors", "adapter_config.json"};

// convert --checkpoint: the newest usable checkpoint under `checkpoint` (a step folder, a
// checkpoints folder or a run's output folder; checksums verified) into `out`. A LoRA run's
// step folder is already a PEFT adapter folder (rank 0 writes it from the adapters every
// rank holds whole): its two files are copied. Full training: the trainable weights,
// consolidated from every rank's file, written with `model_dir`'s config.json and
// tokenizer (the model the run trained; by default the run's output folder).
void convert_checkpoint(const std::string& checkpoint, std::string model_dir, const std::string& out, bool force,
                        const model::ModelWriteOptions& options) {
  const io::ResumePoint point = train::find_resume_point(checkpoint);
  const std::filesystem::path step_dir = point.dir;
  if (std::filesystem::is_regular_file(step_dir / kAdapterFiles[1])) {
    if (options.quantize || options.dtype != DType::f32)
      throw InputError("convert", "--checkpoint of a LoRA run writes its PEFT adapter as it is: --quantize, -q and "
                                  "--dtype do not apply");
    check_output_dir(out, force);
    write_output_dir(out, force, [&](const std::filesystem::path& stage) {
      for (const char* name : kAdapterFiles) std::filesystem::copy_file(step_dir / name, stage / name);
    });
    fmt::print("wrote {} (PEFT adapter of {}, step {})\n", out, step_dir.string(), point.step);
    return;
  }
  if (model_dir.empty()) {
    // OUT/checkpoints/step-N: the run's output folder holds the model's config.json.
    const std::filesystem::path run_dir = step_dir.parent_path().parent_path();
    if (!std::filesystem::is_regular_file(run_dir / "config.json"))
      throw InputError("convert", fmt::format("--checkpoint {}: give --model, the model the run trained (for its "
                                              "config.json and tokenizer); {} has no config.json",
                                              checkpoint, run_dir.empty() ? std::string(".") : run_dir.string()));
    model_dir = run_dir.string();
  }
  check_output_not_input("--out", out, {{"--model", model_dir}, {"--checkpoint", checkpoint}});
  check_output_dir(out, force);
  const model::ModelConfig cfg = model::ModelConfig::load(std::filesystem::path(model_dir) / "config.json");
  const train::ConsolidatedWeights weights = train::read_checkpoint_weights(step_dir);
  size_t asked = 0;
  const model::WeightSource source = [&](const model::ParamInfo& info, std::span<float> values) {
    const std::span<const float> t = weights.tensor(info.name, info.shape, step_dir);
    std::copy(t.begin(), t.end(), values.begin());
    ++asked;
  };
  write_output_dir(out, force, [&](const std::filesystem::path& stage) {
    model::write_model(stage, cfg, options, source);
    // Every tensor of the checkpoint went into the model: none belongs to another one.
    if (asked != weights.layout.table.size())
      throw InputError("convert", fmt::format("{}: holds {} trainable tensors, the model of {} has {} (another model?)",
                                              step_dir.string(), weights.layout.table.size(), model_dir, asked));
    copy_tokenizer_files(model_dir, stage);
  });
  fmt::print("wrote {} (step {} of {}, {})\n", out, point.step, step_dir.string(), model::model_dtype_name(options.dtype));
}

}  // namespace

void add_convert_command(CLI::App& app) {
  struct Options {
    std::string model, out, dtype, checkpoint;
    int bits = 0;
    int64_t group_size = 64;
    bool force = false;
    std::string q;  // -q [BITS]: mlx_lm.convert's switch, or flotilla's -q BITS
    bool dequantize = false;
    int q_bits = 4;
    bool strict = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("convert", "Quantize (MLX layout), de-quantize or re-type a model directory, tensor by "
                                                "tensor; or consolidate a training checkpoint into a model");
  cmd->add_option("--model,--hf-path", opt->model, "Source model directory (float or quantized); with --checkpoint, the "
                                                   "model the run trained (config.json, tokenizer; default: the run's "
                                                   "output folder)")->check(CLI::ExistingDirectory);
  cmd->add_option("--checkpoint", opt->checkpoint,
                  "A training checkpoint (a step folder, or a run's output or checkpoints folder: its newest usable "
                  "step), written by any number of ranks at any --zero stage: full training gives a Hugging Face model "
                  "directory, a LoRA run a PEFT adapter directory (adapter_model.safetensors, adapter_config.json)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--out,--mlx-path", opt->out, "Output model directory (must not exist or be empty)")->required();
  auto* quantize =
      cmd->add_option("--quantize", opt->bits, "Quantize Linear and embedding weights to 2, 4 or 8 bits (0: write float); a weight "
                      "whose input dimension the group size does not divide stays float, and is named");
  // mlx_lm.convert's spelling: -q switches quantization on, --q-bits picks the bits.
  auto* q = cmd->add_option("-q", opt->q, "Quantize: -q BITS, or -q alone for --q-bits bits (mlx_lm's switch)")
                ->expected(0, 1)
                ->type_name("[BITS]");
  cmd->add_option("--q-bits", opt->q_bits, "Bits for -q")->capture_default_str()->needs(q);
  cmd->add_option("--group-size,--q-group-size", opt->group_size, "Elements per scale/bias group")->capture_default_str();
  auto* dequantize = cmd->add_flag("--dequantize,-d", opt->dequantize,
                                   "Write float weights (what convert does without --quantize; mlx_lm's spelling)");
  q->excludes(quantize);
  dequantize->excludes(quantize, q);
  cmd->add_option("--dtype", opt->dtype, "float16, bfloat16 or float32: float tensors, scales and biases "
                                         "(default float16 when quantizing, else float32)");
  cmd->add_flag("--force", opt->force, "Write into a non-empty directory");
  add_strict_flag(cmd, opt->strict);
  cmd->callback([opt, cmd, q] {
    if (opt->model.empty() && opt->checkpoint.empty()) throw InputError("convert", "give --model (or --checkpoint)");
    model::ModelWriteOptions options;
    if (q->count() > 0) {
      if (opt->q.empty()) {
        opt->bits = opt->q_bits;
      } else if (cmd->count("--q-bits") > 0) {
        throw InputError("convert", "give the bits once: -q " + opt->q + " or --q-bits " + std::to_string(opt->q_bits));
      } else {
        try {
          size_t used = 0;
          opt->bits = std::stoi(opt->q, &used);
          if (used != opt->q.size()) throw std::invalid_argument(opt->q);
        } catch (const std::logic_error&) {
          throw InputError("convert", "-q takes a number of bits (2, 4 or 8), not '" + opt->q + "'");
        }
      }
    }
    if (opt->bits != 0) options.quantize = QuantFormat{opt->bits, opt->group_size};
    options.dtype = !opt->dtype.empty() ? model::parse_model_dtype(opt->dtype) : options.quantize ? DType::f16 : DType::f32;
    if (!opt->checkpoint.empty()) {
      convert_checkpoint(opt->checkpoint, opt->model, opt->out, opt->force, options);
      return;
    }
    const std::filesystem::path src_dir = opt->model;
    check_output_not_input("--out", opt->out, {{"--model", opt->model}});
    check_output_dir(opt->out, opt->force);
    const model::ModelConfig cfg = model::ModelConfig::load(src_dir / "config.json");
    // Everything a user can get wrong is checked before the first byte is written. A layer
    // whose input dimension the group size does not divide stays float, as mlx_lm does.
    std::optional<model::QuantizationPlan> plan;
    if (options.quantize) plan = model::plan_quantization(cfg, *options.quantize);

    // A quantized source is read through the model (packed views, dequantized tensor by
    // tensor); a float one straight from its files, converted tensor by tensor.
    std::optional<model::Llama> quantized_src;
    std::optional<io::TensorStore> float_src;
    model::WeightSource source;
    if (cfg.quantization) {
      quantized_src.emplace(model::Llama::load(src_dir, non_finite_policy(opt->strict)));
      source = [&](const model::ParamInfo& info, std::span<float> out) {
        quantized_src->weight_f32(*quantized_src->layout().find(info.name), out);
      };
    } else {
      float_src.emplace(src_dir, non_finite_policy(opt->strict));
      source = [&](const model::ParamInfo& info, std::span<float> out) { float_src->read_f32(info.name, out, info.shape); };
    }
    write_output_dir(opt->out, opt->force, [&](const std::filesystem::path& stage) {
      model::write_model(stage, cfg, options, source);
      copy_tokenizer_files(src_dir, stage);
    });
    if (options.quantize) {
      fmt::print("wrote {} ({}-bit, group size {}, {} scales and float tensors)\n", opt->out, options.quantize->bits,
                 options.quantize->group_size, model::model_dtype_name(options.dtype));
      if (!plan->left_float.empty())
        fmt::print("left float: {} of {} weights, as group size {} does not divide their {}\n",
                   plan->left_float.size(), plan->left_float.size() + plan->quantized.size(),
                   options.quantize->group_size, model::describe_left_float(*plan));
    }
    else
      fmt::print("wrote {} ({})\n", opt->out, model::model_dtype_name(options.dtype));
  });
}

}  // namespace flotilla::cli
