// flotilla grads: logits, loss (and a mixture of experts' router_aux_loss) and every
// parameter gradient for one batch, written as safetensors — what the PyTorch reference test compares against.
#include <fmt/format.h>

#include <nlohmann/json.hpp>
#include <optional>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::cli {
namespace {
// batch.json: {"tokens": [[...], ...], "targets": [[...], ...]} with equal row lengths;
// targets use -100 for positions without loss.
std::vector<int32_t> read_rows(const nlohmann::json& j, const char* key, const std::string& file, int64_t& B,
                               int64_t& T) {
  if (!j.contains(key) || !j[key].is_array() || j[key].empty())
    throw InputError("grads", fmt::format("{}: \"{}\" must be a non-empty array of rows", file, key));
  const auto& rows = j[key];
  B = static_cast<int64_t>(rows.size());
  T = -1;
  std::vector<int32_t> out;
  for (const auto& row : rows) {
    if (!row.is_array() || row.empty() || (T >= 0 && static_cast<int64_t>(row.size()) != T))
      throw InputError("grads", fmt::format("{}: \"{}\" rows must be non-empty arrays of equal length", file, key));
    T = static_cast<int64_t>(row.size());
    for (const auto& v : row) {
      if (!v.is_number_integer()) throw InputError("grads", fmt::format("{}: \"{}\" holds a non-integer", file, key));
      const auto id = v.get<int64_t>();
      if (id < INT32_MIN || id > INT32_MAX)
        throw InputError("grads", fmt::format("{}: \"{}\" holds {}, which is not a token id", file, key, id));
      out.push_back(static_cast<int32_t>(id));
    }
  }
  return out;
}
}  // namespace

void add_grads_command(CLI::App& app) {
  struct Options {
    std::string model, batch, out, adapter;
    std::string dtype = "float32";
    bool force = false, strict = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("grads", "Write logits, loss and parameter gradients of a batch (safetensors)");
  cmd->add_option("--model", opt->model, "Model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--batch", opt->batch, "batch.json with \"tokens\" and \"targets\" (B x T)")
      ->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", opt->out, "Output .safetensors file (an existing one only with --force)")->required();
  cmd->add_flag("--force", opt->force, "Replace an existing --out file");
  add_strict_flag(cmd, opt->strict);
  add_dtype_option(cmd, opt->dtype);
  cmd->add_option("--adapter", opt->adapter, "A LoRA adapter folder (PEFT or mlx_lm): gradients of its tensors (PEFT names), base frozen")
      ->check(CLI::ExistingDirectory);
  cmd->callback([opt] {
    check_output_not_input("--out", opt->out, {{"--model", opt->model}, {"--batch", opt->batch}, {"--adapter", opt->adapter}});
    check_output_file("--out", opt->out, opt->force);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_text_file(opt->batch));
    } catch (const nlohmann::json::parse_error& e) {
      throw InputError("grads", fmt::format("{}: not JSON: {}", opt->batch, json_error_text(e)));
    }
    int64_t B = 0, T = 0, Bt = 0, Tt = 0;
    const std::vector<int32_t> tokens = read_rows(j, "tokens", opt->batch, B, T);
    const std::vector<int32_t> targets = read_rows(j, "targets", opt->batch, Bt, Tt);
    if (B != Bt || T != Tt) throw InputError("grads", opt->batch + ": tokens and targets differ in shape");

    model::Llama model = model::Llama::load(opt->model, non_finite_policy(opt->strict));
    model.set_matmul_input(matmul_dtype_of(opt->dtype));
    if (T > model.config().max_position)
      throw InputError("grads", fmt::format("{}: rows of {} tokens exceed the model's {} positions "
                                            "(max_position_embeddings)",
                                            opt->batch, T, model.config().max_position));
    std::optional<model::LoraAdapters> adapters;
    if (!opt->adapter.empty()) {
      adapters.emplace(model::LoraAdapters::load(opt->adapter, model.config(), non_finite_policy(opt->strict)));
      model.attach_lora(&*adapters);
    }
    model.set_training(false);  // no dropout: the reference computes without it
    model.zero_grads();
    const model::LossSum loss = model.forward(tokens.data(), targets.data(), B, T);
    if (loss.num_tokens == 0) throw InputError("grads", opt->batch + ": every target is ignored (-100)");
    const std::vector<float> logits(model.logits().begin(), model.logits().end());
    model.backward(1.0f / static_cast<float>(loss.num_tokens));
    const float mean_loss = static_cast<float>(loss.mean());

    std::vector<io::TensorToWrite> out;
    out.push_back({"logits", {B, T, model.config().vocab_size}, logits.data()});
    out.push_back({"loss", {1}, &mean_loss});
    // A mixture of experts: its load-balancing loss (the gradients include
    // router_aux_loss_coef times it when the config's output_router_logits is set).
    const auto aux_loss = static_cast<float>(model.router_aux_loss());
    if (model.config().is_moe()) out.push_back({"router_aux_loss", {1}, &aux_loss});
    const model::Llama::Trainable trainable = model.trainable();
    for (const auto& info : trainable.table.params())
      out.push_back({"grad." + info.name, info.shape, trainable.grads.data() + info.offset});
    io::write_safetensors(opt->out, out, DType::f32);
  });
}

}  // namespace flotilla::cli
