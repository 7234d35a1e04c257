#include "flotilla/plan/workload.hpp"

#include <algorithm>
#include <fstream>
#include <optional>
#include <string>

#include "flotilla/model/llama.hpp"
#include "flotilla/model/params.hpp"

namespace flotilla::plan {

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

  std::optional<model::LoraAdapters> adapters;
  const model::ParamTable* trainable = &layout;
  if (lora) {
    adapters.emplace(cfg, lora_config);  // small: only the adapters' buffer is allocated
    trainable = &adapters->table();
  }
  w.trainable_floats = trainable->total_numel();
  for (const model::ParamInfo& p : trainable->params()) {
    if (p.shape.size() == 2)
      w.trainable_matrices.emplace_back(p.shape[0], p.shape[1]);
    else
      w.trainable_vector_floats += p.numel;
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

}  // namespace flotilla::plan
