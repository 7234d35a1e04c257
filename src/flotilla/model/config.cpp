// ModelConfig <-> Hugging Face config.json.
//
// Defaults for absent fields are those of transformers' LlamaConfig, MistralConfig,
// Qwen2Config, MixtralConfig and Qwen2MoeConfig, so a config.json means the same model here as in transformers. What we
// cannot compute the same way (attention/MLP bias on llama, rope types other than llama3,
// activations other than SiLU) is an InputError rather than a silently different model.
#include "flotilla/model/config.hpp"

#include <fmt/format.h>

#include <array>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::model {
namespace {
constexpr std::string_view kConfigComponent = "model/config";
using nlohmann::json;

constexpr std::array<std::pair<Architecture, std::string_view>, 5> kArchitectures{{
    {Architecture::llama, "llama"},
    {Architecture::mistral, "mistral"},
    {Architecture::qwen2, "qwen2"},
    {Architecture::mixtral, "mixtral"},
    {Architecture::qwen2_moe, "qwen2_moe"},
}};

std::string_view hf_class_name(Architecture a) {
  switch (a) {
    case Architecture::llama: return "LlamaForCausalLM";
    case Architecture::mistral: return "MistralForCausalLM";
    case Architecture::qwen2: return "Qwen2ForCausalLM";
    case Architecture::mixtral: return "MixtralForCausalLM";
    case Architecture::qwen2_moe: return "Qwen2MoeForCausalLM";
  }
  return "LlamaForCausalLM";
}

// Reads typed fields of one JSON object; every fault names the source file and the field
// (with its path, e.g. "rope_scaling.factor"). Absent and null both mean "not given".
class FieldReader {
 public:
  FieldReader(const json& j, std::string_view source, std::string prefix = "")
      : j_(j), source_(source), prefix_(std::move(prefix)) {}

  [[noreturn]] void fail(std::string_view what) const {
    throw InputError(kConfigComponent, fmt::format("{}: {}", source_, what));
  }

  const json* find(const char* key) const {
    const auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  std::string name(const char* key) const { return prefix_ + key; }

  std::optional<int64_t> opt_int(const char* key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (v->is_number_unsigned()) {
      if (v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(fmt::format("field '{}' is out of range: {}", name(key), v->dump()));
      return static_cast<int64_t>(v->get<uint64_t>());
    }
    if (v->is_number_integer()) return v->get<int64_t>();
    type_error(key, "an integer", *v);
  }
  int64_t req_int(const char* key) const {
    const auto v = opt_int(key);
    if (!v) fail(fmt::format("missing required field '{}'", name(key)));
    return *v;
  }
  std::optional<double> opt_number(const char* key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) type_error(key, "a number", *v);
    return v->get<double>();
  }
  double req_number(const char* key) const {
    const auto v = opt_number(key);
    if (!v) fail(fmt::format("missing required field '{}'", name(key)));
    return *v;
  }
  std::optional<bool> opt_bool(const char* key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) type_error(key, "true or false", *v);
    return v->get<bool>();
  }
  std::optional<std::string> opt_string(const char* key) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) type_error(key, "a string", *v);
    return v->get<std::string>();
  }
  // A token id: an integer, or a list of integers (the first is "the" id).
  std::vector<int32_t> opt_token_ids(const char* key) const {
    const json* v = find(key);
    if (!v) return {};
    std::vector<int32_t> ids;
    const auto take = [&](const json& x) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 ||
          x.get<int64_t>() > std::numeric_limits<int32_t>::max())
        fail(fmt::format("field '{}' must be a non-negative token id or a list of them, got {}",
                         name(key), v->dump()));
      ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
    };
    if (v->is_array()) {
      for (const auto& x : *v) take(x);
    } else {
      take(*v);
    }
    return ids;
  }

 private:
  [[noreturn]] void type_error(const char* key, std::string_view want, const json& v) const {
    fail(fmt::format("field '{}' must be {}, got {} {}", name(key), want, v.type_name(), v.dump()));
  }

  const json& j_;
  std::string_view source_;
  std::string prefix_;
};

// Mixtral: every layer's MLP is num_local_experts experts of width intermediate_size; the
// top-k weights are always renormalised.
MoeConfig parse_mixtral_moe(const FieldReader& f, const ModelConfig& c) {
  MoeConfig m;
  m.num_experts = f.opt_int("num_local_experts").value_or(8);
  if (m.num_experts <= 0)
    f.fail(fmt::format("field 'num_local_experts' must be positive, got {}", m.num_experts));
  m.top_k = f.opt_int("num_experts_per_tok").value_or(2);
  m.expert_ffn_dim = c.ffn_dim;
  m.norm_topk_prob = true;
  m.router_aux_loss_coef = static_cast<float>(f.opt_number("router_aux_loss_coef").value_or(0.001));
  m.output_router_logits = f.opt_bool("output_router_logits").value_or(false);
  // Router jitter (random noise on the router's inputs in training) is refused in one line:
  // the released Mixtral configs set it to 0, and a run with it could not be reproduced.
  if (f.opt_number("router_jitter_noise").value_or(0.0) != 0.0)
    f.fail("field 'router_jitter_noise' must be 0: router jitter is not supported");
  return m;
}

// Qwen2-MoE: sparse layers as decoder_sparse_step and mlp_only_layers say, each with
// num_experts experts of moe_intermediate_size and a shared expert with a sigmoid gate.
MoeConfig parse_qwen2_moe(const FieldReader& f) {
  MoeConfig m;
  m.num_experts = f.opt_int("num_experts").value_or(60);
  if (m.num_experts <= 0) f.fail(fmt::format("field 'num_experts' must be positive, got {}", m.num_experts));
  m.top_k = f.opt_int("num_experts_per_tok").value_or(4);
  m.expert_ffn_dim = f.opt_int("moe_intermediate_size").value_or(1408);
  m.shared_expert_ffn_dim = f.opt_int("shared_expert_intermediate_size").value_or(5632);
  m.norm_topk_prob = f.opt_bool("norm_topk_prob").value_or(false);
  m.router_aux_loss_coef = static_cast<float>(f.opt_number("router_aux_loss_coef").value_or(0.001));
  m.output_router_logits = f.opt_bool("output_router_logits").value_or(false);
  m.decoder_sparse_step = f.opt_int("decoder_sparse_step").value_or(1);
  if (const json* layers = f.find("mlp_only_layers")) {
    if (!layers->is_array())
      f.fail(fmt::format("field 'mlp_only_layers' must be a list of layer indices, got {}", layers->dump()));
    for (const json& x : *layers) {
      if (!x.is_number_integer())
        f.fail(fmt::format("field 'mlp_only_layers' must be a list of layer indices, got {}", layers->dump()));
      m.mlp_only_layers.push_back(x.get<int64_t>());
    }
  }
  return m;
}

Architecture parse_architecture(const FieldReader& f) {
  std::optional<std::string> type = f.opt_string("model_type");
  if (!type) {
    // Very old configs name only the class; map the ones we know.
    if (const json* a = f.find("architectures"); a && a->is_array() && !a->empty()) {
      for (const auto& [arch, name] : kArchitectures)
        if ((*a)[0] == std::string(hf_class_name(arch))) return arch;
    }
    f.fail("missing required field 'model_type'");
  }
  for (const auto& [arch, name] : kArchitectures)
    if (*type == name) return arch;
  f.fail(fmt::format("unknown model_type '{}' (supported: llama, mistral, qwen2, mixtral, qwen2_moe)", *type));
}

// rope_scaling (or transformers 5's rope_parameters): null, "default", or Llama 3's.
kernels::RopeScaling parse_rope_scaling(const json& j, std::string_view source,
                                        const char* field) {
  const FieldReader f(j, source, std::string(field) + ".");
  if (!j.is_object())
    f.fail(fmt::format("field '{}' must be an object or null, got {}", field, j.type_name()));
  std::optional<std::string> type = f.opt_string("rope_type");
  if (!type) type = f.opt_string("type");
  if (!type) f.fail(fmt::format("field '{}' has no 'rope_type'", field));
  kernels::RopeScaling s;
  if (*type == "default") return s;
  if (*type != "llama3")
    f.fail(fmt::format("{} type '{}' is not supported (supported: llama3){}", field, *type,
                       *type == "linear" ? "; linear position interpolation is not implemented"
                                         : ""));
  s.factor = static_cast<float>(f.req_number("factor"));
  s.low_freq_factor = static_cast<float>(f.req_number("low_freq_factor"));
  s.high_freq_factor = static_cast<float>(f.req_number("high_freq_factor"));
  s.original_max_position = f.req_int("original_max_position_embeddings");
  if (!(s.factor > 0.0f)) f.fail(fmt::format("{}.factor must be positive", field));
  if (!(s.low_freq_factor > 0.0f) || !(s.high_freq_factor > s.low_freq_factor))
    f.fail(fmt::format("{} needs 0 < low_freq_factor < high_freq_factor", field));
  if (s.original_max_position <= 0)
    f.fail(fmt::format("{}.original_max_position_embeddings must be positive", field));
  return s;
}

// The shortest decimal that reads back as the same float: 1e-5f is written 1e-05, not
// 9.999999747378752e-06, so a config round-trips through Python unchanged.
double float_for_json(float x) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, x);
  double d = 0.0;
  std::from_chars(buf, res.ptr, d);
  return d;
}

// The fields of a mixture of experts, named as config.json names them for this model_type.
void validate_moe(const ModelConfig& c, const FieldReader& f) {
  const MoeConfig& m = c.moe;
  const bool mixtral = c.arch == Architecture::mixtral;
  const char* experts = mixtral ? "num_local_experts" : "num_experts";
  if (m.top_k <= 0) f.fail(fmt::format("field 'num_experts_per_tok' must be positive, got {}", m.top_k));
  if (m.top_k > m.num_experts)
    f.fail(fmt::format("field 'num_experts_per_tok' ({}) is larger than {} ({}): a token cannot pick more experts "
                       "than there are",
                       m.top_k, experts, m.num_experts));
  if (m.expert_ffn_dim <= 0)
    f.fail(fmt::format("field '{}' must be positive, got {}", mixtral ? "intermediate_size" : "moe_intermediate_size",
                       m.expert_ffn_dim));
  if (m.shared_expert_ffn_dim < 0)
    f.fail(fmt::format("field 'shared_expert_intermediate_size' must not be negative, got {}",
                       m.shared_expert_ffn_dim));
  if (m.decoder_sparse_step <= 0)
    f.fail(fmt::format("field 'decoder_sparse_step' must be positive, got {}", m.decoder_sparse_step));
  for (int64_t l : m.mlp_only_layers)
    if (l < 0 || l >= c.n_layers)
      f.fail(fmt::format("field 'mlp_only_layers' names layer {}, outside the model's {} layers", l, c.n_layers));
  if (!std::isfinite(m.router_aux_loss_coef) || m.router_aux_loss_coef < 0.0f)
    f.fail("field 'router_aux_loss_coef' must be a finite number >= 0");
}

void validate(const ModelConfig& c, const FieldReader& f) {
  const auto positive = [&](int64_t v, const char* field) {
    if (v <= 0) f.fail(fmt::format("field '{}' must be positive, got {}", field, v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.dim, "hidden_size");
  positive(c.n_layers, "num_hidden_layers");
  positive(c.n_heads, "num_attention_heads");
  positive(c.n_kv_heads, "num_key_value_heads");
  positive(c.head_dim, "head_dim");
  positive(c.ffn_dim, "intermediate_size");
  positive(c.max_position, "max_position_embeddings");
  if (c.n_heads % c.n_kv_heads != 0)
    f.fail(fmt::format("num_attention_heads ({}) is not divisible by num_key_value_heads ({})",
                       c.n_heads, c.n_kv_heads));
  if (c.head_dim % 2 != 0)
    f.fail(fmt::format("head_dim ({}) must be even for rotary embeddings", c.head_dim));
  if (!(c.rms_norm_eps > 0.0f)) f.fail("field 'rms_norm_eps' must be positive");
  if (!(c.rope_theta > 0.0f)) f.fail("field 'rope_theta' must be positive");
  if (c.sliding_window < 0) f.fail("field 'sliding_window' must not be negative");
  if (c.is_moe()) validate_moe(c, f);
  // Sizes whose products overflow 64-bit counts (or name no machine's model) are refused
  // here, before anything multiplies them: 2^40 parameters is 4 TiB of float32.
  const double params = static_cast<double>(c.vocab_size) * static_cast<double>(c.dim) * 2.0 +
                        static_cast<double>(c.n_layers) *
                            (4.0 * static_cast<double>(c.dim) * static_cast<double>(c.n_heads) *
                                 static_cast<double>(c.head_dim) +
                             3.0 * static_cast<double>(c.dim) *
                                 (static_cast<double>(c.ffn_dim) +
                                  static_cast<double>(c.moe.num_experts) * static_cast<double>(c.moe.expert_ffn_dim) +
                                  static_cast<double>(c.moe.shared_expert_ffn_dim)));
  if (params > 1099511627776.0)
    f.fail(fmt::format("the sizes describe a model of about {:.3g} parameters, more than flotilla supports (2^40)",
                       params));
}
// "quantization": {"group_size", "bits", ["mode": "affine"], [module path: false | {..}]}
QuantFormat parse_quant_format(const json& q, std::string_view source, const std::string& where) {
  const FieldReader f(q, source, where + ".");
  QuantFormat fmt_q;
  fmt_q.bits = static_cast<int>(f.req_int("bits"));
  fmt_q.group_size = f.req_int("group_size");
  if (!quant_bits_supported(fmt_q.bits))
    f.fail(fmt::format("{}.bits = {} is not supported (2, 4 or 8)", where, fmt_q.bits));
  if (fmt_q.group_size <= 0 || fmt_q.group_size % fmt_q.per_word() != 0)
    f.fail(fmt::format("{}.group_size = {} must be a positive multiple of {} (values per 32-bit word at {} bits)",
                       where, fmt_q.group_size, fmt_q.per_word(), fmt_q.bits));
  if (const auto mode = f.opt_string("mode"); mode && *mode != "affine")
    f.fail(fmt::format("{}.mode '{}' is not supported (only affine)", where, *mode));
  return fmt_q;
}

QuantizationConfig parse_quantization(const json& q, std::string_view source, const std::string& key) {
  if (!q.is_object()) throw InputError(kConfigComponent, fmt::format("{}: '{}' is not an object", source, key));
  if (const auto it = q.find("quant_method"); it != q.end() && *it != "mlx")
    throw InputError(kConfigComponent, fmt::format("{}: {}.quant_method {} is not supported (only MLX's affine layout)",
                                             source, key, it->dump()));
  QuantizationConfig qc;
  qc.format = parse_quant_format(q, source, key);
  for (const auto& [name, v] : q.items()) {
    if (v.is_boolean()) {
      if (!v.get<bool>()) qc.per_module[name] = std::nullopt;
      else qc.per_module[name] = qc.format;
    } else if (v.is_object()) {
      qc.per_module[name] = parse_quant_format(v, source, key + "." + name);
    }
  }
  return qc;
}
}  // namespace

std::optional<QuantFormat> QuantizationConfig::for_module(std::string_view path) const {
  const auto it = per_module.find(path);
  return it == per_module.end() ? std::optional<QuantFormat>(format) : it->second;
}

std::string_view architecture_name(Architecture a) {
  for (const auto& [arch, name] : kArchitectures)
    if (arch == a) return name;
  return "llama";
}

bool ModelConfig::moe_layer(int64_t l) const {
  if (!is_moe()) return false;
  if (std::find(moe.mlp_only_layers.begin(), moe.mlp_only_layers.end(), l) != moe.mlp_only_layers.end()) return false;
  return (l + 1) % moe.decoder_sparse_step == 0;
}

int64_t ModelConfig::num_params() const {
  const int64_t attention = dim * q_dim() + 2 * dim * kv_dim() + q_dim() * dim +
                            (qkv_bias ? q_dim() + 2 * kv_dim() : 0);
  const int64_t norms = 2 * dim;
  const int64_t embeddings = vocab_size * dim;
  int64_t layers = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    // A dense MLP (or Qwen2-MoE's shared expert), then the router and the experts.
    int64_t mlp = 3 * dim * dense_mlp_dim(l);
    if (moe_layer(l))
      mlp += moe.num_experts * dim + moe.num_experts * 3 * dim * moe.expert_ffn_dim +
             (moe.shared_expert_ffn_dim > 0 ? dim : 0);
    layers += attention + mlp + norms;
  }
  return embeddings + layers + dim + (tie_embeddings ? 0 : vocab_size * dim);
}

ModelConfig ModelConfig::from_json(const nlohmann::json& j, std::string_view source) {
  if (!j.is_object())
    throw InputError(kConfigComponent, fmt::format("{}: top level is not a JSON object", source));
  const FieldReader f(j, source);
  ModelConfig c;
  c.arch = parse_architecture(f);

  c.dim = f.req_int("hidden_size");
  c.n_layers = f.req_int("num_hidden_layers");
  c.n_heads = f.req_int("num_attention_heads");
  c.ffn_dim = f.req_int("intermediate_size");
  c.vocab_size = f.req_int("vocab_size");
  c.n_kv_heads = f.opt_int("num_key_value_heads").value_or(c.n_heads);
  if (const auto hd = f.opt_int("head_dim")) {
    c.head_dim = *hd;
  } else {
    if (c.n_heads > 0 && c.dim % c.n_heads != 0)
      f.fail(fmt::format("hidden_size ({}) is not divisible by num_attention_heads ({}) and no "
                         "head_dim is given",
                         c.dim, c.n_heads));
    c.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
  }
  const int64_t default_max_position = c.arch == Architecture::llama ? 2048
                                       : c.arch == Architecture::mistral || c.arch == Architecture::mixtral
                                           ? 4096 * 32
                                           : 32768;
  c.max_position = f.opt_int("max_position_embeddings").value_or(default_max_position);
  // MixtralConfig's defaults differ: rms_norm_eps 1e-5, rope_theta 1e6.
  const bool mixtral = c.arch == Architecture::mixtral;
  c.rms_norm_eps = static_cast<float>(f.opt_number("rms_norm_eps").value_or(mixtral ? 1e-5 : 1e-6));
  c.initializer_range = static_cast<float>(f.opt_number("initializer_range").value_or(0.02));
  c.tie_embeddings = f.opt_bool("tie_word_embeddings").value_or(false);

  // transformers 5 moves rope_theta and the scaling into "rope_parameters".
  const json* rope_parameters = f.find("rope_parameters");
  std::optional<double> theta = f.opt_number("rope_theta");
  if (!theta && rope_parameters && rope_parameters->is_object())
    theta = FieldReader(*rope_parameters, source, "rope_parameters.").opt_number("rope_theta");
  c.rope_theta = static_cast<float>(theta.value_or(mixtral ? 1e6 : 10000.0));
  if (const json* rs = f.find("rope_scaling")) {
    c.rope_scaling = parse_rope_scaling(*rs, source, "rope_scaling");
  } else if (rope_parameters) {
    c.rope_scaling = parse_rope_scaling(*rope_parameters, source, "rope_parameters");
  }

  const auto bos = f.opt_token_ids("bos_token_id");
  if (!bos.empty()) c.bos_token_id = bos[0];
  const auto eos = f.opt_token_ids("eos_token_id");
  if (!eos.empty()) c.eos_token_id = eos[0];
  if (eos.size() > 1) c.eos_token_ids = eos;

  if (const auto dtype = f.opt_string("torch_dtype")) c.torch_dtype = *dtype;
  else if (const auto dtype5 = f.opt_string("dtype")) c.torch_dtype = *dtype5;

  if (const auto act = f.opt_string("hidden_act"); act && *act != "silu")
    f.fail(fmt::format("hidden_act '{}' is not supported (only silu)", *act));

  switch (c.arch) {
    case Architecture::qwen2:
      c.qkv_bias = true;  // Qwen2 always has q/k/v bias and never o_proj bias.
      if (f.opt_bool("use_sliding_window").value_or(false))
        c.sliding_window = f.opt_int("sliding_window").value_or(4096);
      break;
    case Architecture::mistral:
      c.sliding_window = f.opt_int("sliding_window").value_or(0);
      break;
    case Architecture::mixtral:
      c.sliding_window = f.opt_int("sliding_window").value_or(0);
      c.moe = parse_mixtral_moe(f, c);
      break;
    case Architecture::qwen2_moe:
      c.qkv_bias = f.opt_bool("qkv_bias").value_or(true);
      if (f.opt_bool("use_sliding_window").value_or(false))
        c.sliding_window = f.opt_int("sliding_window").value_or(4096);
      c.moe = parse_qwen2_moe(f);
      break;
    case Architecture::llama:
      // Llama's attention_bias puts a bias on o_proj as well, which we do not model.
      if (f.opt_bool("attention_bias").value_or(false))
        f.fail("attention_bias true (bias on q/k/v/o projections) is not supported");
      if (f.opt_bool("mlp_bias").value_or(false)) f.fail("mlp_bias true is not supported");
      break;
  }
  if (const json* q = f.find("quantization")) c.quantization = parse_quantization(*q, source, "quantization");
  else if (const json* qc = f.find("quantization_config")) c.quantization = parse_quantization(*qc, source, "quantization_config");
  validate(c, f);
  return c;
}

ModelConfig ModelConfig::load(const std::filesystem::path& config_json) {
  std::error_code ec;
  if (!std::filesystem::exists(config_json, ec))
    throw InputError(kConfigComponent, fmt::format("{}: file not found", config_json.string()));
  // A directory, a FIFO or a device: read_text_file says which.
  const std::string text = read_text_file(config_json);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw InputError(kConfigComponent, fmt::format("{}: not valid JSON (byte {}): {}",
                                             config_json.string(), e.byte,
                                             json_error_text(e)));
  }
  return from_json(j, config_json.string());
}

nlohmann::json ModelConfig::to_json() const {
  // nlohmann's default object sorts keys, as transformers' to_json_string does.
  json j;
  j["architectures"] = {std::string(hf_class_name(arch))};
  j["model_type"] = std::string(architecture_name(arch));
  j["hidden_size"] = dim;
  j["intermediate_size"] = ffn_dim;
  j["num_hidden_layers"] = n_layers;
  j["num_attention_heads"] = n_heads;
  j["num_key_value_heads"] = n_kv_heads;
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position;
  j["rms_norm_eps"] = float_for_json(rms_norm_eps);
  j["rope_theta"] = float_for_json(rope_theta);
  if (rope_scaling.factor > 0.0f) {
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", float_for_json(rope_scaling.factor)},
        {"low_freq_factor", float_for_json(rope_scaling.low_freq_factor)},
        {"high_freq_factor", float_for_json(rope_scaling.high_freq_factor)},
        {"original_max_position_embeddings", rope_scaling.original_max_position},
    };
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["tie_word_embeddings"] = tie_embeddings;
  j["bos_token_id"] = bos_token_id >= 0 ? json(bos_token_id) : json(nullptr);
  if (eos_token_ids.size() > 1 && eos_token_ids[0] == eos_token_id)
    j["eos_token_id"] = eos_token_ids;
  else
    j["eos_token_id"] = eos_token_id >= 0 ? json(eos_token_id) : json(nullptr);
  j["hidden_act"] = "silu";
  j["initializer_range"] = float_for_json(initializer_range);
  j["torch_dtype"] = torch_dtype;
  j["use_cache"] = true;
  if (quantization) {
    json q = {{"group_size", quantization->format.group_size}, {"bits", quantization->format.bits}};
    for (const auto& [name, f] : quantization->per_module)
      q[name] = f ? json{{"group_size", f->group_size}, {"bits", f->bits}} : json(false);
    j["quantization"] = q;
  }
  j["attention_dropout"] = 0.0;
  switch (arch) {
    case Architecture::llama:
      j["attention_bias"] = false;
      j["mlp_bias"] = false;
      j["pretraining_tp"] = 1;
      break;
    case Architecture::mistral:
      j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
      break;
    case Architecture::qwen2:
      j["use_sliding_window"] = sliding_window > 0;
      j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
      j["max_window_layers"] = n_layers;
      break;
    case Architecture::mixtral:
      j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
      j["num_local_experts"] = moe.num_experts;
      j["num_experts_per_tok"] = moe.top_k;
      j["router_aux_loss_coef"] = float_for_json(moe.router_aux_loss_coef);
      j["output_router_logits"] = moe.output_router_logits;
      j["router_jitter_noise"] = 0.0;
      break;
    case Architecture::qwen2_moe:
      j["use_sliding_window"] = sliding_window > 0;
      j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
      j["max_window_layers"] = n_layers;
      j["qkv_bias"] = qkv_bias;
      j["num_experts"] = moe.num_experts;
      j["num_experts_per_tok"] = moe.top_k;
      j["moe_intermediate_size"] = moe.expert_ffn_dim;
      j["shared_expert_intermediate_size"] = moe.shared_expert_ffn_dim;
      j["norm_topk_prob"] = moe.norm_topk_prob;
      j["decoder_sparse_step"] = moe.decoder_sparse_step;
      j["mlp_only_layers"] = moe.mlp_only_layers;
      j["router_aux_loss_coef"] = float_for_json(moe.router_aux_loss_coef);
      j["output_router_logits"] = moe.output_router_logits;
      break;
  }
  return j;
}

// Every preset's hidden and intermediate sizes are multiples of 64, so that each Linear
// weight and the embeddings quantize at the default group size (convert --quantize 4).
ModelConfig preset_config(std::string_view name) {
  ModelConfig c;  // llama, rms_norm_eps 1e-5 and rope_theta 10000, as llama2.c
  c.torch_dtype = "float32";
  if (name == "tiny") {
    c.vocab_size = 512;
    c.dim = 64;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.ffn_dim = 192;  // 8/3 x 64 rounded up to a multiple of 64, as Llama rounds to its multiple_of
    c.max_position = 512;
  } else if (name == "15M") {
    // The size of llama2.c's stories15M (dim 288, 6 layers, 6 heads, 15.19M) at a width 64
    // divides: 15.01M parameters.
    c.vocab_size = 32000;
    c.dim = 256;
    c.n_layers = 8;
    c.n_heads = 8;
    c.n_kv_heads = 8;
    c.ffn_dim = 768;
    c.max_position = 256;
    c.tie_embeddings = true;  // llama2.c shares the classifier with the embedding
  } else if (name == "110M") {  // llama2.c stories110M
    c.vocab_size = 32000;
    c.dim = 768;
    c.n_layers = 12;
    c.n_heads = 12;
    c.n_kv_heads = 12;
    c.ffn_dim = 2048;
    c.max_position = 1024;
    c.tie_embeddings = true;
  } else {
    throw InputError(kConfigComponent,
                     fmt::format("unknown preset '{}' (presets: tiny, 15M, 110M)", name));
  }
  c.head_dim = c.dim / c.n_heads;
  return c;
}

}  // namespace flotilla::model
