// Llama::load / Llama::save: Hugging Face model directories (config.json + safetensors).
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/io/tensor_store.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/model/quantized_view.hpp"

namespace flotilla::model {

namespace {
// mlx_lm's SwitchGLU layout of an MoE layer (model_writer.hpp's switch_mlp_module): the
// stacked module an expert's tensor comes from when the directory has it; "" for any other
// tensor, or where the directory holds the experts one by one.
std::string stacked_module(const io::TensorStore& store, const std::string& name) {
  const std::string stacked = switch_mlp_module(name);
  return !stacked.empty() && store.has(stacked + ".weight") ? stacked : "";
}

// Fills params[r] from tensor `info` for every range r of `ranges` (ascending, disjoint)
// that meets the tensor, starting the walk at `from`; returns where the next, later tensor's
// walk starts.
std::span<const ElementRange>::iterator read_tensor_parts(const io::TensorStore& store, const ParamInfo& info,
                                                          std::span<const ElementRange> ranges,
                                                          std::span<const ElementRange>::iterator from,
                                                          std::span<float> params) {
  // Every rank checks every tensor it holds (present, its shape and dtype), whether its
  // ranges meet it or not: a fault is then every rank's error, not one rank's.
  store.read_f32_slice(info.name, info.shape, 0, {});
  const int64_t begin = info.offset, end = info.offset + info.numel;
  while (from != ranges.end() && from->end <= begin) ++from;
  for (auto r = from; r != ranges.end() && r->begin < end; ++r) {
    const int64_t b = std::max(r->begin, begin), e = std::min(r->end, end);
    if (b < e)
      store.read_f32_slice(info.name, info.shape, b - begin,
                           params.subspan(static_cast<size_t>(b), static_cast<size_t>(e - b)));
  }
  return from;
}
}  // namespace

Llama Llama::load(const std::filesystem::path& dir, io::NonFinitePolicy non_finite, const HeldPart& held,
                  std::span<const ElementRange> ranges) {
  if (!std::filesystem::is_directory(dir))
    throw InputError("model", dir.string() + ": not a model directory");
  const ModelConfig cfg = ModelConfig::load(dir / "config.json");
  auto store_owner = std::make_shared<const io::TensorStore>(dir, non_finite);
  const io::TensorStore& store = *store_owner;
  // Which weights are stored quantized: those with a P.scales next to P.weight, as mlx_lm
  // decides when it loads (config.json says how, the tensors say which).
  std::set<std::string> quantized;
  std::map<std::string, std::string> stacked;  // an expert's tensor -> its switch_mlp module
  const ParamLayout float_layout(cfg);
  for (const ParamInfo& info : float_layout.params()) {
    std::string module = cfg.is_moe() ? stacked_module(store, info.name) : "";
    if (!module.empty()) stacked[info.name] = module;
    if (module.empty()) module = info.name.substr(0, info.name.size() - std::string_view(".weight").size());
    if (info.decay && info.shape.size() == 2 && store.has(module + ".scales")) quantized.insert(info.name);
  }
  if (!quantized.empty() && !cfg.quantization)
    throw InputError("model", fmt::format("{}: {} has .scales (a quantized weight) but config.json has no \"quantization\"",
                                          dir.string(), *quantized.begin()));
  if (quantized.empty() && cfg.quantization)
    throw InputError("model", fmt::format("{}: config.json has \"quantization\" but no weight has .scales and .biases: "
                                          "the quantization config does not match the tensors", dir.string()));
  Llama model = [&] {
    try {
      return Llama(cfg, quantized);
    } catch (const std::bad_alloc&) {
      throw InputError("model", fmt::format("{}: a model of {} parameters needs {:.1f} GiB, more than this machine can allocate",
                                            (dir / "config.json").string(), cfg.num_params(),
                                            static_cast<double>(cfg.num_params()) * 4.0 / (1 << 30)));
    }
  }();
  if (held.layers || held.experts) model.hold_only(held);
  int64_t at = 0;
  for (const ElementRange& r : ranges) {
    if (r.begin < at || r.end < r.begin || r.end > static_cast<int64_t>(model.params_.size()))
      throw Error("model", "load: ranges must be ascending, disjoint and inside the parameters");
    at = r.end;
  }
  const std::vector<ElementRange> all = model.held_ranges();
  if (ranges.empty()) ranges = all;
  auto next_range = ranges.begin();
  for (const ParamInfo& info : model.layout_.params()) {
    const auto from_stack = stacked.find(info.name);
    if (info.quantized) {
      // A view into the mapped file (slots in layout order): pages are read on use only.
      model.qweights_.push_back(from_stack == stacked.end()
                                    ? quantized_view(store, info, cfg)
                                    : quantized_view(store, from_stack->second, info.shape[0], info.shape[1], cfg,
                                                     cfg.moe.num_experts, expert_of_tensor(info.name)));
      continue;
    }
    if (from_stack != stacked.end()) {
      // A float stack (an unquantized mlx_lm model): expert e's (out, in) block of it.
      const std::string name = from_stack->second + ".weight";
      const std::vector<int64_t> shape = {cfg.moe.num_experts, info.shape[0], info.shape[1]};
      store.read_f32_slice(name, shape, 0, {});  // every rank checks it, held or not
      if (model.holds(info))
        store.read_f32_slice(name, shape, expert_of_tensor(info.name) * info.numel,
                             model.params_.span().subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel)));
      continue;
    }
    if (!model.holds(info)) {
      // Another pipeline stage's or expert-parallel rank's: never read, but it must be
      // there, so that every rank refuses a directory missing one alike (one line naming it).
      (void)store.info(info.name);
      continue;
    }
    next_range = read_tensor_parts(store, info, ranges, next_range, model.params_.span());
  }
  // Tensors we do not use: tied lm_head copies, rotary caches of old checkpoints. Anything
  // else means the directory holds a different architecture than config.json says.
  std::set<std::string> stack_modules;
  for (const auto& [_, module] : stacked) stack_modules.insert(module);
  for (const std::string& name : store.names()) {
    if (model.layout_.find(name)) continue;
    const auto last_dot = name.rfind('.');
    if (last_dot != std::string::npos && stack_modules.count(name.substr(0, last_dot))) continue;
    const auto dot = name.rfind('.');
    if (dot != std::string::npos && (name.ends_with(".scales") || name.ends_with(".biases")) &&
        quantized.count(name.substr(0, dot) + ".weight"))
      continue;
    const bool harmless = name.ends_with("rotary_emb.inv_freq") || (cfg.tie_embeddings && name == "lm_head.weight");
    if (!harmless)
      throw InputError("model", fmt::format("{}: unexpected tensor '{}' for a {} model", dir.string(), name,
                                            architecture_name(cfg.arch)));
  }
  if (model.quantized()) {
    model.qstorage_.push_back(std::move(store_owner));  // the views point into its maps
    model.qweights_mapped_ = true;
  }
  return model;
}

void Llama::save(const std::filesystem::path& dir, int64_t max_shard_bytes) const {
  if (quantized())
    throw Error("model", "save of a quantized model: write it with model::write_model (flotilla convert / fuse)");
  std::filesystem::create_directories(dir);
  std::vector<io::TensorToWrite> tensors;
  tensors.reserve(layout_.params().size());
  for (const ParamInfo& info : layout_.params())
    tensors.push_back(io::TensorToWrite{info.name, info.shape, params_.data() + info.offset});
  io::write_safetensors_sharded(dir, tensors, DType::f32, static_cast<uint64_t>(max_shard_bytes));
  write_file_atomic(dir / "config.json", cfg_.to_json().dump(2) + "\n");
}

}  // namespace flotilla::model
