#include "flotilla/model/lora.hpp"

#include "flotilla/model/tensor_parallel.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/io/tensor_store.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::model {
namespace {
constexpr std::string_view kLoraComponent = "model/lora";
constexpr std::array<std::string_view, kNumLoraTargets> kModules = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"};
constexpr int kNumDenseLoraTargets = 7;  // q..down: the ones a dense Llama has

bool is_attention(LoraTarget t) {
  return t == LoraTarget::q || t == LoraTarget::k || t == LoraTarget::v || t == LoraTarget::o;
}
bool is_mixtral_expert(LoraTarget t) { return t == LoraTarget::w1 || t == LoraTarget::w2 || t == LoraTarget::w3; }

// The expert projection an MLP target reaches in an MoE layer: Mixtral's w1 gate, w3 up,
// w2 down; Qwen2-MoE's experts' gate/up/down_proj.
std::optional<ExpertProj> expert_proj_of(LoraTarget t) {
  switch (t) {
    case LoraTarget::gate:
    case LoraTarget::w1: return ExpertProj::gate;
    case LoraTarget::up:
    case LoraTarget::w3: return ExpertProj::up;
    case LoraTarget::down:
    case LoraTarget::w2: return ExpertProj::down;
    default: return std::nullopt;
  }
}

std::string_view block_of(LoraTarget t) {
  const bool attn = t == LoraTarget::q || t == LoraTarget::k || t == LoraTarget::v || t == LoraTarget::o;
  return attn ? "self_attn" : "mlp";
}

// The base model's name of a layer's own adapted module (without ".weight"): attention, the
// dense MLP, or in an MoE layer the shared expert.
std::string layer_module(const ModelConfig& m, int64_t layer, LoraTarget t) {
  const std::string_view block = is_attention(t) ? "self_attn" : m.moe_layer(layer) ? "mlp.shared_expert" : "mlp";
  return fmt::format("model.layers.{}.{}.{}", layer, block, kModules[static_cast<size_t>(t)]);
}

// ... of expert e's projection in an MoE layer.
std::string expert_module(const ModelConfig& m, int64_t layer, LoraTarget t, int64_t e) {
  const std::string_view block = m.arch == Architecture::mixtral ? "block_sparse_moe" : "mlp";
  return fmt::format("model.layers.{}.{}.experts.{}.{}", layer, block, e, kModules[static_cast<size_t>(t)]);
}

// mlx_lm's: the base model's own module path.
std::string mlx_module_path(int64_t layer, LoraTarget t) {
  return fmt::format("model.layers.{}.{}.{}", layer, block_of(t), kModules[static_cast<size_t>(t)]);
}

// An mlx_lm lora_parameters key ("self_attn.q_proj", "mlp.down_proj") as a target.
std::optional<LoraTarget> lora_target_of_key(std::string_view key) {
  for (size_t i = 0; i < kNumDenseLoraTargets; ++i) {
    const auto t = static_cast<LoraTarget>(i);
    if (key == fmt::format("{}.{}", block_of(t), kModules[i])) return t;
  }
  return std::nullopt;
}

// (out, in) of layer l's own linear layer t (0 x 0: it has none, as a Qwen2-MoE layer
// without a shared expert).
std::pair<int64_t, int64_t> linear_shape(const ModelConfig& m, int64_t l, LoraTarget t) {
  const int64_t F = m.dense_mlp_dim(l);
  switch (t) {
    case LoraTarget::q: return {m.q_dim(), m.dim};
    case LoraTarget::k:
    case LoraTarget::v: return {m.kv_dim(), m.dim};
    case LoraTarget::o: return {m.dim, m.q_dim()};
    case LoraTarget::gate:
    case LoraTarget::up: return {F, m.dim};
    case LoraTarget::down: return {m.dim, F};
    default: return {0, 0};
  }
}

// (out, in) of an expert's projection.
std::pair<int64_t, int64_t> expert_shape(const ModelConfig& m, ExpertProj p) {
  const int64_t Fe = m.moe.expert_ffn_dim;
  return p == ExpertProj::down ? std::pair{m.dim, Fe} : std::pair{Fe, m.dim};
}

const WeightRef& expert_weight(const ExpertParams& ew, ExpertProj p) {
  return p == ExpertProj::gate ? ew.gate_proj : p == ExpertProj::up ? ew.up_proj : ew.down_proj;
}

const WeightRef& base_weight(const LayerParams& lp, LoraTarget t) {
  switch (t) {
    case LoraTarget::q: return lp.q_proj;
    case LoraTarget::k: return lp.k_proj;
    case LoraTarget::v: return lp.v_proj;
    case LoraTarget::o: return lp.o_proj;
    case LoraTarget::gate: return lp.gate_proj;
    case LoraTarget::up: return lp.up_proj;
    case LoraTarget::down: return lp.down_proj;
    default: break;
  }
  throw Error("model/lora", "a LoRA target that is no layer's own linear layer");
}

// The message of an InputError from below, without its "[component] " prefix.
std::string reason(const Error& e) { return std::string(e.what()).substr(e.component().size() + 3); }

// The adapters an adapter_config.json describes, a fault in them (a rank larger than a
// layer, too many layers) worded as the config file's.
LoraAdapters adapters_of_config(const ModelConfig& model, const LoraConfig& cfg,
                                const std::filesystem::path& config_path) {
  try {
    return LoraAdapters(model, cfg);
  } catch (const InputError& e) {
    throw InputError(kLoraComponent, config_path.string() + ": " + reason(e));
  }
}
}  // namespace

std::string_view lora_target_module(LoraTarget t) { return kModules[static_cast<size_t>(t)]; }

std::vector<LoraTarget> LoraConfig::parse_targets(std::string_view list) {
  std::vector<LoraTarget> out;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = std::min(list.find(',', start), list.size());
    std::string name(list.substr(start, comma - start));
    if (!name.empty()) {
      if (!name.ends_with("_proj") && name != "w1" && name != "w2" && name != "w3") name += "_proj";
      const auto it = std::find(kModules.begin(), kModules.end(), name);
      if (it == kModules.end())
        throw InputError(kLoraComponent,
                         fmt::format("unknown LoRA target '{}' (expected any of q,k,v,o,gate,up,down, or Mixtral's "
                                     "expert projections w1,w2,w3)",
                                     list.substr(start, comma - start)));
      const auto t = static_cast<LoraTarget>(it - kModules.begin());
      if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
    }
    start = comma + 1;
  }
  if (out.empty()) throw InputError(kLoraComponent, "no LoRA targets given");
  std::sort(out.begin(), out.end());
  return out;
}

LoraAdapters::LoraAdapters(const ModelConfig& model, LoraConfig cfg) : model_(model), cfg_(std::move(cfg)) {
  if (cfg_.rank <= 0) throw InputError(kLoraComponent, fmt::format("LoRA rank must be positive, got {}", cfg_.rank));
  if (!(cfg_.dropout >= 0.0f && cfg_.dropout < 1.0f))
    throw InputError(kLoraComponent, fmt::format("LoRA dropout must be in [0, 1), got {}", cfg_.dropout));
  if (!std::isfinite(cfg_.alpha))
    throw InputError(kLoraComponent, fmt::format("LoRA alpha (--lora-alpha) must be a finite number, got {}", cfg_.alpha));
  if (cfg_.targets.empty()) throw InputError(kLoraComponent, "no LoRA targets given");
  const int64_t L = model.n_layers;
  const int64_t n = cfg_.num_layers < 0 ? L : cfg_.num_layers;
  if (n <= 0 || n > L)
    throw InputError(kLoraComponent, fmt::format("--num-layers {} is outside 1..{} (the model's layers)", n, L));
  first_layer_ = L - n;
  const bool mixtral = model.arch == Architecture::mixtral;
  for (LoraTarget t : cfg_.targets) {
    if (is_mixtral_expert(t) && !mixtral)
      throw InputError(kLoraComponent,
                       fmt::format("LoRA target {} is a Mixtral expert projection; this {} model has none{}",
                                   lora_target_module(t), architecture_name(model.arch),
                                   model.is_moe() ? " (its experts' projections are gate, up and down)" : ""));
    if (mixtral && expert_proj_of(t) && !is_mixtral_expert(t))
      throw InputError(kLoraComponent,
                       fmt::format("a mixtral model has no {}: its experts' projections are w1 (gate), w3 (up) and "
                                   "w2 (down), e.g. --lora-targets q,v,w1,w2,w3",
                                   lora_target_module(t)));
  }
  // Every adapted linear layer in table order: by layer, then target, a Qwen2-MoE shared
  // expert's before the experts'. A rank past both sides of a layer adds nothing B A could
  // not hold, and a huge one (a typo, a foreign adapter_config.json) would be allocated
  // before anything else is checked: the table holds offsets only until the end.
  auto add = [&](std::string base, int64_t l, LoraTarget t, int64_t e, std::pair<int64_t, int64_t> shape) {
    const auto [out, in] = shape;
    if (cfg_.rank > std::max(out, in))
      throw InputError(kLoraComponent, fmt::format("LoRA rank {} is larger than both sides of {} ({} x {})", cfg_.rank,
                                                   lora_target_module(t), out, in));
    LoraSlot s;
    s.in = in;
    s.out = out;
    // No weight decay on adapters by default would be mlx_lm's choice too (it uses Adam).
    s.a = table_.add("base_model.model." + base + ".lora_A.weight", {cfg_.rank, in}, true);
    s.b = table_.add("base_model.model." + base + ".lora_B.weight", {out, cfg_.rank}, true);
    modules_.push_back(Module{std::move(base), l, t, e, s});
    return s;
  };
  slots_.assign(static_cast<size_t>(L), {});
  expert_slots_.assign(static_cast<size_t>(L), {});
  for (int64_t l = first_layer_; l < L; ++l) {
    for (LoraTarget t : cfg_.targets) {
      const auto shape = linear_shape(model, l, t);
      if (shape.first > 0) slots_[static_cast<size_t>(l)][static_cast<size_t>(t)] = add(layer_module(model, l, t), l, t, -1, shape);
      const std::optional<ExpertProj> p = expert_proj_of(t);
      if (!model.moe_layer(l) || !p) continue;
      auto& experts = expert_slots_[static_cast<size_t>(l)][static_cast<size_t>(*p)];
      for (int64_t e = 0; e < model.moe.num_experts; ++e)
        experts.push_back(add(expert_module(model, l, t, e), l, t, e, expert_shape(model, *p)));
    }
  }
  params_.resize(static_cast<size_t>(table_.total_numel()));
}

std::span<float> LoraAdapters::grads() {
  if (grads_.empty()) grads_.resize(params_.size());
  return grads_.span();
}

void LoraAdapters::zero_grads() {
  if (grads_.empty())
    grads_.resize(params_.size());
  else
    grads_.zero();
}

const LoraSlot& LoraAdapters::expert_slot(int64_t layer, ExpertProj p, int64_t e) const {
  static const LoraSlot kInactive;
  const auto& experts = expert_slots_[static_cast<size_t>(layer)][static_cast<size_t>(p)];
  return experts.empty() ? kInactive : experts[static_cast<size_t>(e)];
}

void LoraAdapters::init_random(uint64_t seed) {
  Rng rng(seed);
  params_.zero();
  for (const Module& m : modules_) {
    const LoraSlot& s = m.slot;
    const float bound = 1.0f / std::sqrt(static_cast<float>(s.in));
    rng.fill_uniform(std::span<float>(params_.data() + s.a, static_cast<size_t>(cfg_.rank * s.in)), -bound, bound);
  }
}

void LoraAdapters::save_peft(const std::filesystem::path& dir, const std::string& base_model) const {
  std::filesystem::create_directories(dir);
  std::vector<io::TensorToWrite> tensors;
  for (const ParamInfo& info : table_.params())
    tensors.push_back(io::TensorToWrite{info.name, info.shape, params_.data() + info.offset});
  io::write_safetensors(dir / "adapter_model.safetensors", tensors, DType::f32);
  nlohmann::json modules = nlohmann::json::array();
  for (LoraTarget t : cfg_.targets) modules.push_back(lora_target_module(t));
  nlohmann::json layers = nlohmann::json::array();
  for (int64_t l = first_layer_; l < model_.n_layers; ++l) layers.push_back(l);
  const nlohmann::json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", base_model},
      {"r", cfg_.rank},
      {"lora_alpha", cfg_.alpha},
      {"lora_dropout", cfg_.dropout},
      {"target_modules", modules},
      {"layers_to_transform", first_layer_ == 0 ? nlohmann::json(nullptr) : layers},
      {"layers_pattern", first_layer_ == 0 ? nlohmann::json(nullptr) : nlohmann::json("layers")},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"modules_to_save", nullptr},
      {"use_rslora", false},
      {"use_dora", false},
      {"rank_pattern", nlohmann::json::object()},
      {"alpha_pattern", nlohmann::json::object()},
      {"revision", nullptr}};
  write_file_atomic(dir / "adapter_config.json", config.dump(2) + "\n");
}

LoraAdapters LoraAdapters::load_peft(const std::filesystem::path& dir, const ModelConfig& model,
                                     io::NonFinitePolicy non_finite) {
  const std::filesystem::path config_path = dir / "adapter_config.json";
  return load_peft_files(read_adapter_config(config_path), config_path, dir / "adapter_model.safetensors", model,
                         non_finite);
}

LoraAdapters LoraAdapters::load(const std::filesystem::path& path, const ModelConfig& model,
                                io::NonFinitePolicy non_finite) {
  std::error_code ec;
  const bool is_file = std::filesystem::is_regular_file(path, ec);
  if (!is_file && !std::filesystem::is_directory(path, ec))
    throw InputError(kLoraComponent, path.string() + ": no such adapter file or folder");
  const std::filesystem::path dir = is_file ? path.parent_path().empty() ? "." : path.parent_path() : path;
  const std::filesystem::path config_path = dir / "adapter_config.json";
  if (!std::filesystem::is_regular_file(config_path, ec))
    throw InputError(kLoraComponent, fmt::format("{}: no adapter_config.json beside the adapter weights (a PEFT or "
                                             "mlx_lm adapter folder has one)", dir.string()));
  const nlohmann::json j = read_adapter_config(config_path);
  if (j.is_object() && j.contains("lora_parameters"))
    return load_mlx_files(j, config_path, is_file ? path : dir / "adapters.safetensors", model, non_finite);
  return load_peft_files(j, config_path, is_file ? path : dir / "adapter_model.safetensors", model, non_finite);
}

nlohmann::json LoraAdapters::read_adapter_config(const std::filesystem::path& config_path) {
  try {
    return nlohmann::json::parse(read_text_file(config_path));
  } catch (const nlohmann::json::parse_error& e) {
    throw InputError(kLoraComponent, fmt::format("{}: not JSON: {}", config_path.string(), json_error_text(e)));
  }
}

LoraAdapters LoraAdapters::load_mlx_files(const nlohmann::json& j, const std::filesystem::path& config_path,
                                          const std::filesystem::path& weights_path, const ModelConfig& model,
                                          io::NonFinitePolicy non_finite) {
  auto fail = [&](const std::string& why) { throw InputError(kLoraComponent, config_path.string() + ": " + why); };
  try {
    const std::string type = j.value("fine_tune_type", std::string("lora"));
    if (type == "dora") fail("DoRA adapters (fine_tune_type dora) are not supported");
    if (type != "lora") fail(fmt::format("fine_tune_type is '{}': not LoRA adapters", type));
    const nlohmann::json& lp = j["lora_parameters"];
    if (!lp.is_object()) fail("lora_parameters must be a mapping of rank, scale, dropout and keys");
    LoraConfig cfg;
    // mlx_lm's defaults where its config leaves a value out (mlx_lm/lora.py CONFIG_DEFAULTS).
    const nlohmann::json& rank = lp.contains("rank") ? lp["rank"] : nlohmann::json(8);
    if (!rank.is_number_integer()) fail("lora_parameters.rank must be an integer, got " + rank.dump());
    cfg.rank = rank.get<int64_t>();
    const nlohmann::json& scale = lp.contains("scale") ? lp["scale"] : nlohmann::json(10.0);
    if (!scale.is_number()) fail("lora_parameters.scale must be a number, got " + scale.dump());
    // mlx_lm adds scale * (x A) B; PEFT and flotilla add (alpha / rank) * ...
    cfg.alpha = scale.get<float>() * static_cast<float>(cfg.rank);
    if (lp.contains("dropout") && !lp["dropout"].is_null()) {
      if (!lp["dropout"].is_number()) fail("lora_parameters.dropout must be a number, got " + lp["dropout"].dump());
      cfg.dropout = lp["dropout"].get<float>();
    }
    std::string targets = "q,v";  // mlx_lm's keys for a Llama-family model
    if (lp.contains("keys") && !lp["keys"].is_null()) {
      if (!lp["keys"].is_array()) fail("lora_parameters.keys must be a list of layer keys, got " + lp["keys"].dump());
      targets.clear();
      for (const nlohmann::json& key : lp["keys"]) {
        const std::optional<LoraTarget> t = key.is_string() ? lora_target_of_key(key.get<std::string>()) : std::nullopt;
        if (!t)
          fail(fmt::format("lora_parameters.keys: {} is not a layer flotilla adapts (self_attn.q_proj, k_proj, "
                           "v_proj, o_proj, mlp.gate_proj, up_proj, down_proj)", key.dump()));
        targets += std::string(lora_target_module(*t)) + ",";
      }
    }
    cfg.targets = LoraConfig::parse_targets(targets);
    if (model.is_moe())
      for (LoraTarget t : cfg.targets)
        if (!is_attention(t))
          fail(fmt::format("lora_parameters.keys: mlx_lm adapters on a mixture-of-experts model's MLP ({}) are not "
                           "read yet: only attention (self_attn.*)",
                           lora_target_module(t)));
    const nlohmann::json& layers = j.contains("num_layers") ? j["num_layers"] : nlohmann::json(16);
    if (!layers.is_number_integer()) fail("num_layers must be an integer, got " + layers.dump());
    // mlx_lm applies its adapters to model.layers[-num_layers:]: past the model's depth, all.
    cfg.num_layers = layers.get<int64_t>() < 0 || layers.get<int64_t>() >= model.n_layers ? -1 : layers.get<int64_t>();
    LoraAdapters adapters = adapters_of_config(model, cfg, config_path);
    const io::TensorStore store(weights_path, non_finite);
    // mlx_lm's names: the model's own module path, then lora_a (in, rank) / lora_b (rank, out).
    std::map<std::string, std::pair<int64_t, LoraTarget>> expected;  // name -> (layer, target)
    for (int64_t l = adapters.first_layer(); l < model.n_layers; ++l)
      for (LoraTarget t : cfg.targets) expected[mlx_module_path(l, t) + ".lora_a"] = {l, t};
    for (const std::string& name : store.names()) {
      std::string as_a = name;  // "...lora_b" -> "...lora_a": expected holds A's names
      if (as_a.ends_with(".lora_b")) as_a.back() = 'a';
      if (!expected.contains(as_a))
        throw InputError(kLoraComponent, fmt::format("{}: unexpected tensor '{}': adapter_config.json on this {}-layer "
                                                 "model adapts {} of layers {}..{}",
                                                 weights_path.string(), name, model.n_layers, targets.substr(0, targets.size() - 1),
                                                 adapters.first_layer(), model.n_layers - 1));
    }
    for (const auto& [a_name, where] : expected) {
      const auto [l, t] = where;
      const LoraSlot& s = adapters.slot(l, t);
      const int64_t r = cfg.rank;
      std::vector<float> a(static_cast<size_t>(s.in * r)), b(static_cast<size_t>(r * s.out));
      store.read_f32(a_name, a, std::vector<int64_t>{s.in, r});
      std::string b_name = a_name;
      b_name.back() = 'b';
      store.read_f32(b_name, b, std::vector<int64_t>{r, s.out});
      // Ours are the transposes: A (rank, in), B (out, rank).
      float* dst_a = adapters.params_.data() + s.a;
      float* dst_b = adapters.params_.data() + s.b;
      for (int64_t i = 0; i < s.in; ++i)
        for (int64_t k = 0; k < r; ++k) dst_a[k * s.in + i] = a[static_cast<size_t>(i * r + k)];
      for (int64_t k = 0; k < r; ++k)
        for (int64_t o = 0; o < s.out; ++o) dst_b[o * r + k] = b[static_cast<size_t>(k * s.out + o)];
    }
    return adapters;
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("malformed: ") + e.what());
  }
  throw Error(kLoraComponent, "unreachable");
}

LoraAdapters LoraAdapters::load_peft_files(const nlohmann::json& j, const std::filesystem::path& config_path,
                                           const std::filesystem::path& weights_path, const ModelConfig& model,
                                           io::NonFinitePolicy non_finite) {
  auto fail = [&](const std::string& why) { throw InputError(kLoraComponent, config_path.string() + ": " + why); };
  if (!j.is_object()) fail(fmt::format("must be a JSON object, got {}", j.type_name()));
  // Typed reads, worded as config.json's: a fault names the field and what it holds.
  const auto type_error = [&](const char* key, std::string_view want, const nlohmann::json& v) {
    fail(fmt::format("field '{}' must be {}, got {} {}", key, want, v.type_name(), v.dump()));
  };
  const auto field = [&](const char* key, bool required) -> const nlohmann::json* {
    const auto it = j.find(key);
    if (it != j.end() && !it->is_null()) return &*it;
    if (required) fail(fmt::format("missing required field '{}'", key));
    return nullptr;
  };
  const auto number = [&](const char* key, const nlohmann::json& v) {
    if (!v.is_number()) type_error(key, "a number", v);
    return v.get<float>();
  };
  try {
    if (j.value("peft_type", std::string("LORA")) != "LORA") fail("peft_type is not LORA");
    if (j.value("use_dora", false)) fail("DoRA adapters are not supported");
    if (j.value("use_rslora", false)) fail("rsLoRA scaling is not supported");
    if (j.value("bias", std::string("none")) != "none") fail("adapter biases are not supported");
    if (j.contains("rank_pattern") && !j["rank_pattern"].empty()) fail("per-module ranks (rank_pattern) are not supported");
    LoraConfig cfg;
    const nlohmann::json& r = *field("r", true);
    if (!r.is_number_integer()) type_error("r", "an integer", r);
    cfg.rank = r.get<int64_t>();
    cfg.alpha = number("lora_alpha", *field("lora_alpha", true));
    if (const nlohmann::json* d = field("lora_dropout", false)) cfg.dropout = number("lora_dropout", *d);
    std::string targets;
    const nlohmann::json& modules = *field("target_modules", true);
    if (modules.is_string()) {  // PEFT's "all-linear", or one module name
      targets = modules.get<std::string>() == "all-linear" ? "q,k,v,o,gate,up,down" : modules.get<std::string>();
    } else if (modules.is_array() &&
               std::all_of(modules.begin(), modules.end(), [](const auto& m) { return m.is_string(); })) {
      for (const auto& m : modules) targets += m.get<std::string>() + ",";
    } else {
      type_error("target_modules", "a list of module names", modules);
    }
    try {
      cfg.targets = LoraConfig::parse_targets(targets);
    } catch (const InputError& e) {
      fail("target_modules: " + reason(e));
    }
    cfg.num_layers = -1;
    if (j.contains("layers_pattern") && !j["layers_pattern"].is_null() && j["layers_pattern"] != "layers" &&
        j["layers_pattern"] != nlohmann::json::array({"layers"}))
      fail("layers_pattern must be \"layers\" for a Llama-family model");
    if (const nlohmann::json* lt = field("layers_to_transform", false)) {
      const bool integers =
          lt->is_number_integer() ||
          (lt->is_array() && std::all_of(lt->begin(), lt->end(), [](const auto& l) { return l.is_number_integer(); }));
      if (!integers) type_error("layers_to_transform", "a layer index or a list of them", *lt);
      std::vector<int64_t> layers =
          lt->is_number_integer() ? std::vector<int64_t>{lt->get<int64_t>()} : lt->get<std::vector<int64_t>>();
      std::sort(layers.begin(), layers.end());
      // We adapt a contiguous range ending at the last layer, as mlx_lm's --num-layers;
      // adapters on other layer sets (PEFT allows any) are refused, not misapplied.
      for (size_t i = 0; i < layers.size(); ++i)
        if (layers[i] != model.n_layers - static_cast<int64_t>(layers.size()) + static_cast<int64_t>(i))
          fail(fmt::format("layers_to_transform {} must be the last N layers of the model (layers 0..{})", lt->dump(),
                           model.n_layers - 1));
      cfg.num_layers = static_cast<int64_t>(layers.size());
    }
    LoraAdapters adapters = adapters_of_config(model, cfg, config_path);
    const io::TensorStore store(weights_path, non_finite);
    // Names first: a tensor this model lacks (adapters for another model, a renamed tensor)
    // is named as itself, not as the expected tensor it displaced.
    std::string adapted;  // "q_proj,v_proj"
    for (LoraTarget t : cfg.targets) adapted += (adapted.empty() ? "" : ",") + std::string(lora_target_module(t));
    for (const std::string& name : store.names())
      if (!adapters.table_.find(name))
        throw InputError(kLoraComponent, fmt::format("{}: unexpected tensor '{}': adapter_config.json on this {}-layer "
                                                 "model adapts {} of layers {}..{}",
                                                 weights_path.string(), name, model.n_layers, adapted,
                                                 adapters.first_layer(), model.n_layers - 1));
    for (const ParamInfo& info : adapters.table_.params()) {
      std::span<float> dst(adapters.params_.data() + info.offset, static_cast<size_t>(info.numel));
      store.read_f32(info.name, dst, info.shape);
    }
    return adapters;
  } catch (const nlohmann::json::exception& e) {
    fail("malformed: " + json_error_text(e));
  }
  throw Error(kLoraComponent, "unreachable");
}

void LoraAdapters::merge_slot(const LoraSlot& s, float* w) const {
  // W (out, in) += scale * B (out, r) @ A (r, in) = scale * B @ (A^T)^T
  std::vector<float> a_t(static_cast<size_t>(s.in * cfg_.rank));
  const float* a = params_.data() + s.a;
  for (int64_t r = 0; r < cfg_.rank; ++r)
    for (int64_t i = 0; i < s.in; ++i) a_t[static_cast<size_t>(i * cfg_.rank + r)] = a[r * s.in + i];
  kernels::matmul_accumulate(w, params_.data() + s.b, a_t.data(), s.out, cfg_.rank, s.in, cfg_.scale());
}

void LoraAdapters::merge_into(std::span<float> base_params, const ParamLayout& layout) const {
  for (const Module& m : modules_) {
    const LayerParams& lp = layout.layers[static_cast<size_t>(m.layer)];
    const WeightRef& w = m.expert >= 0 ? expert_weight(lp.experts[static_cast<size_t>(m.expert)], *expert_proj_of(m.target))
                                       : base_weight(lp, m.target);
    if (!w.is_dense()) throw Error("model/lora", "merge_into a quantized base: merge tensor by tensor (merge_into_tensor)");
    merge_slot(m.slot, base_params.data() + w.offset());
  }
}

void LoraAdapters::forward(int64_t layer, LoraTarget t, float* out, const float* x, float* u, float* xd, int64_t N,
                           std::optional<uint64_t> dropout_seed, kernels::GemmInput input) const {
  const LoraSlot& s = slot(layer, t);
  if (!s.active()) return;
  if (dropout_seed) {
    kernels::dropout_forward(xd, x, N * s.in, cfg_.dropout, *dropout_seed);
    x = xd;
  }
  project_down(layer, t, u, x, N, input);
  project_up(layer, t, out, u, N, input);
}

void LoraAdapters::project_down(int64_t layer, LoraTarget t, float* u, const float* x, int64_t N,
                                kernels::GemmInput input) const {
  const LoraSlot& s = slot(layer, t);
  if (!s.active()) return;
  kernels::matmul_forward(u, x, params_.data() + s.a, nullptr, N, s.in, cfg_.rank, input);
  kernels::scale_inplace(u, N * cfg_.rank, cfg_.scale());
}

void LoraAdapters::project_up(int64_t layer, LoraTarget t, float* out, const float* u, int64_t N,
                              kernels::GemmInput input) const {
  const LoraSlot& s = slot(layer, t);
  if (!s.active()) return;
  kernels::matmul_accumulate(out, u, params_.data() + s.b, N, cfg_.rank, s.out, 1.0f, input);
}

bool LoraAdapters::merge_into_tensor(std::string_view name, std::span<float> w) const {
  if (!name.ends_with(".weight")) return false;
  name.remove_suffix(7);
  for (const Module& m : modules_) {
    if (name != m.base) continue;
    if (static_cast<int64_t>(w.size()) != m.slot.in * m.slot.out) throw Error("model/lora", "merge_into_tensor: wrong size");
    merge_slot(m.slot, w.data());
    return true;
  }
  return false;
}

void LoraAdapters::expert_forward(int64_t layer, ExpertProj p, int64_t e, float* out, const float* x, int64_t n,
                                  std::optional<uint64_t> dropout_seed, kernels::GemmInput input,
                                  TensorParallelGroup* tp) const {
  const LoraSlot& s = expert_slot(layer, p, e);
  if (!s.active() || n == 0) return;
  const int64_t r = cfg_.rank;
  const bool row_parallel = tp && p == ExpertProj::down;
  std::vector<float> xd;                              // (n, in)   dropout(x)
  std::vector<float> u(static_cast<size_t>(n * r));  // (n, rank) scale * xd A^T
  if (dropout_seed) {
    xd.resize(static_cast<size_t>(n * s.in));
    if (row_parallel)
      kernels::dropout_forward_columns(xd.data(), x, n, s.in, s.in * tp->tp_size(), s.in * tp->tp_rank(), cfg_.dropout,
                                       *dropout_seed);
    else
      kernels::dropout_forward(xd.data(), x, n * s.in, cfg_.dropout, *dropout_seed);
    x = xd.data();
  }
  kernels::matmul_forward(u.data(), x, params_.data() + s.a, nullptr, n, s.in, r, input);
  kernels::scale_inplace(u.data(), n * r, cfg_.scale());
  if (row_parallel) {
    tp->all_reduce_sum(std::span<float>(u), "tp expert LoRA u (row-parallel)");
    if (tp->tp_rank() != 0) return;
  }
  kernels::matmul_accumulate(out, u.data(), params_.data() + s.b, n, r, s.out, 1.0f, input);
}

void LoraAdapters::expert_backward(int64_t layer, ExpertProj p, int64_t e, float* dx, const float* dout,
                                   const float* x, int64_t n, std::optional<uint64_t> dropout_seed,
                                   kernels::GemmInput input, TensorParallelGroup* tp) {
  const LoraSlot& s = expert_slot(layer, p, e);
  if (!s.active() || n == 0) return;
  const int64_t r = cfg_.rank;
  const bool row_parallel = tp && p == ExpertProj::down, column_parallel = tp && !row_parallel;
  const float* a = params_.data() + s.a;  // (rank, in)
  const float* b = params_.data() + s.b;  // (out, rank)
  float* g = grads().data();
  std::vector<float> xd;                                  // (n, in)
  std::vector<float> u(static_cast<size_t>(n * r));      // (n, rank)
  std::vector<float> du(static_cast<size_t>(n * r), 0);  // (n, rank)
  // u = scale * xd A^T, as forward computed it
  if (dropout_seed) {
    xd.resize(static_cast<size_t>(n * s.in));
    if (row_parallel)
      kernels::dropout_forward_columns(xd.data(), x, n, s.in, s.in * tp->tp_size(), s.in * tp->tp_rank(), cfg_.dropout,
                                       *dropout_seed);
    else
      kernels::dropout_forward(xd.data(), x, n * s.in, cfg_.dropout, *dropout_seed);
  }
  const float* xin = dropout_seed ? xd.data() : x;
  kernels::matmul_forward(u.data(), xin, a, nullptr, n, s.in, r, input);
  kernels::scale_inplace(u.data(), n * r, cfg_.scale());
  if (row_parallel) tp->all_reduce_sum(std::span<float>(u), "tp expert LoRA u (row-parallel)");
  // out += u B^T  =>  dB += dout^T u,  du = dout B (then times scale: u's factor)
  kernels::matmul_backward(du.data(), g + s.b, nullptr, dout, u.data(), b, n, r, s.out, input);
  kernels::scale_inplace(du.data(), n * r, cfg_.scale());
  // xd A^T  =>  dA += du^T xd,  dxd = du A;  x -> xd is dropout
  float* dA = g + s.a;
  std::vector<float> dxd;  // (n, in)
  float* dxin = dx;
  if (dx && dropout_seed) {
    dxd.assign(static_cast<size_t>(n * s.in), 0.0f);
    dxin = dxd.data();
  }
  if (column_parallel) {  // d(x) from this rank's share of du; A from the sum
    if (dxin) kernels::matmul_backward(dxin, nullptr, nullptr, du.data(), xin, a, n, s.in, r, input);
    tp->all_reduce_sum(std::span<float>(du), "tp expert LoRA gradient");
    kernels::matmul_backward(nullptr, dA, nullptr, du.data(), xin, a, n, s.in, r, input);
  } else {
    kernels::matmul_backward(dxin, dA, nullptr, du.data(), xin, a, n, s.in, r, input);
  }
  if (!dx || !dropout_seed) return;
  if (row_parallel)
    kernels::dropout_backward_columns(dx, dxd.data(), n, s.in, s.in * tp->tp_size(), s.in * tp->tp_rank(), cfg_.dropout,
                                      *dropout_seed);
  else
    kernels::dropout_backward(dx, dxd.data(), n * s.in, cfg_.dropout, *dropout_seed);
}

}  // namespace flotilla::model
