#include "flotilla/plan/workload.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <fstream>
#include <optional>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/params.hpp"

namespace flotilla::plan {

int64_t weight_words(const model::ModelConfig& cfg, const model::ParamInfo& p) {
  const std::string module = p.name.substr(0, p.name.rfind('.'));
  const std::optional<QuantFormat> f = cfg.quantization && p.decay && p.shape.size() == 2
                                           ? cfg.quantization->for_module(module)
                                           : std::nullopt;
  if (!f) return p.numel;
  const int64_t groups_of_scales = p.numel / f->group_size;
  return p.numel / f->per_word() + 2 * ((groups_of_scales * 2 + 3) / 4);
}

int64_t model_words(const model::ModelConfig& cfg) {
  const model::ParamLayout layout(cfg);
  if (!cfg.quantization) return layout.total_numel();
  int64_t words = 0;
  for (const model::ParamInfo& p : layout.params()) words += weight_words(cfg, p);
  return words;
}

double Workload::bf16_scratch_bytes() const {
  if (dtype != kernels::GemmInput::bf16) return 0.0;
  const auto rows = static_cast<double>(batch_size * seq_len);
  const auto widest_input = static_cast<double>(std::max({model.dim, model.ffn_dim, model.q_dim()}));
  const double widest = std::max(widest_input, static_cast<double>(model.vocab_size));
  return 2.0 * rows * (widest + widest_input);
}

int64_t bf16_copy_floats(const model::ModelConfig& cfg) {
  const model::ParamLayout layout(cfg);
  int64_t floats = 0;
  for (const model::ParamInfo& p : layout.params()) {
    if (p.shape.size() != 2) continue;
    if (p.name == "model.embed_tokens.weight" && !cfg.tie_embeddings) continue;
    if (cfg.quantization && p.decay && cfg.quantization->for_module(p.name.substr(0, p.name.rfind('.')))) continue;
    floats += p.numel;
  }
  return floats;
}

Workload describe_workload(const model::ModelConfig& cfg, bool lora, const model::LoraConfig& lora_config,
                           int64_t batch_size, int64_t seq_len, int64_t grad_accum, bool grad_checkpoint) {
  Workload w;
  w.model = cfg;
  w.lora = lora;
  w.lora_config = lora_config;
  w.batch_size = batch_size;
  w.seq_len = seq_len;
  w.grad_accum = grad_accum;
  w.grad_checkpoint = grad_checkpoint;
  const model::ParamLayout layout(cfg);
  w.model_floats = layout.total_numel();
  std::vector<int64_t> per_layer(static_cast<size_t>(cfg.n_layers), 0);
  int64_t outside_layers = 0;
  for (const model::ParamInfo& p : layout.params()) {
    const std::string prefix = "model.layers.";
    if (p.name.starts_with(prefix)) {
      const size_t layer = std::stoul(p.name.substr(prefix.size()));
      if (layer < per_layer.size()) per_layer[layer] += p.numel;
    } else {
      outside_layers = std::max(outside_layers, p.numel);
    }
  }
  w.largest_layer_floats = outside_layers;
  for (const int64_t n : per_layer) w.largest_layer_floats = std::max(w.largest_layer_floats, n);
  if (cfg.n_layers > 0) {
    w.zero3_group_floats.push_back(layout.layers[0].ln1.offset());
    for (int64_t l = 0; l < cfg.n_layers; ++l) {
      const int64_t end = l + 1 < cfg.n_layers ? layout.layers[static_cast<size_t>(l + 1)].ln1.offset()
                                               : layout.final_norm.offset();
      w.zero3_group_floats.push_back(end - layout.layers[static_cast<size_t>(l)].ln1.offset());
    }
    w.zero3_group_floats.push_back(layout.total_numel() - layout.final_norm.offset());
  }
  if (cfg.quantization) {
    // A 4-bit (or 8-bit) base: the weights stored quantized take their packed words and
    // their scales and biases (f16, as MLX and `flotilla init --quantize` write them), in
    // 4-byte words as the packed arena lays them out (Llama::packed_places); model_floats
    // and the groups count these words, which is what the base costs in memory and on the
    // wire (ZeRO-3 gathers them as they are).
    std::fill(w.zero3_group_floats.begin(), w.zero3_group_floats.end(), 0);
    w.model_floats = 0;
    const auto groups = static_cast<int64_t>(w.zero3_group_floats.size());
    for (const model::ParamInfo& p : layout.params()) {
      const int64_t words = weight_words(cfg, p);
      w.model_floats += words;
      if (groups == 0) continue;
      const std::string prefix = "model.layers.";
      int64_t g = 0;  // the embedding
      if (p.name.starts_with(prefix)) g = std::min<int64_t>(groups - 2, std::stoll(p.name.substr(prefix.size())) + 1);
      else if (p.name.starts_with("lm_head") || p.name.starts_with("model.norm")) g = groups - 1;
      w.zero3_group_floats[static_cast<size_t>(g)] += words;
    }
  }
  w.tied_embeddings = cfg.tie_embeddings;
  w.bf16_copy_floats = bf16_copy_floats(cfg);

  std::optional<model::LoraAdapters> adapters;
  const model::ParamTable* trainable = &layout;
  if (lora) {
    adapters.emplace(cfg, lora_config);  // small: only the adapters' buffer is allocated
    trainable = &adapters->table();
  }
  w.trainable_floats = trainable->total_numel();
  const std::vector<model::ParamInfo>& params = trainable->params();
  for (size_t i = 0; i < params.size(); ++i)
    if (model::expert_of_tensor(params[i].name) >= 0)
      w.trainable_expert_floats += (i + 1 < params.size() ? params[i + 1].offset : w.trainable_floats) - params[i].offset;
  for (const model::ParamInfo& p : trainable->params()) {
    if (p.shape.size() == 2)
      w.trainable_matrices.emplace_back(p.shape[0], p.shape[1]);
    else
      w.trainable_vector_floats += p.numel;
    w.largest_trainable_floats = std::max(w.largest_trainable_floats, p.numel);
  }
  w.activation_bytes = model::Llama::activation_bytes(cfg, adapters ? &*adapters : nullptr, batch_size, seq_len,
                                                   grad_checkpoint);
  return w;
}

int64_t machine_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemTotal:") return kib * 1024;
  return 0;
}

int64_t parse_memory_bytes(std::string_view text, std::string_view flag) {
  struct Unit {
    std::string_view name;
    double factor;
  };
  static constexpr Unit kUnits[] = {
      {"", 1.0},          {"b", 1.0},
      {"k", 0x1p10},      {"kib", 0x1p10}, {"kb", 1e3},
      {"m", 0x1p20},      {"mib", 0x1p20}, {"mb", 1e6},
      {"g", 0x1p30},      {"gib", 0x1p30}, {"gb", 1e9},
      {"t", 0x1p40},      {"tib", 0x1p40}, {"tb", 1e12},
  };
  std::string s;
  for (const char c : text)
    if (!std::isspace(static_cast<unsigned char>(c))) s.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  double value = 0;
  const char* end = s.data() + s.size();
  const auto [ptr, ec] = std::from_chars(s.data(), end, value);
  if (ec == std::errc() && ptr != s.data() && std::isfinite(value) && value > 0) {
    const std::string_view unit(ptr, static_cast<size_t>(end - ptr));
    for (const Unit& u : kUnits) {
      if (u.name != unit) continue;
      const double bytes = value * u.factor;
      if (bytes >= 1 && bytes < 0x1p62) return static_cast<int64_t>(bytes);
    }
  }
  throw InputError("plan", fmt::format("{} '{}': not a memory size; write e.g. 24GiB, 16GB, 512MiB or a number of bytes",
                                       flag, text));
}

}  // namespace flotilla::plan
