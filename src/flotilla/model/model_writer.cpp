#include "flotilla/model/model_writer.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/log.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/io/safetensors_stream.hpp"
#include "flotilla/kernels/quant.hpp"

namespace flotilla::model {
namespace {
constexpr std::string_view kModelWriterComponent = "model/writer";
constexpr size_t kConvertChunk = size_t{1} << 20;  // elements per f16/bf16 conversion chunk

void write_float(io::TensorSink& sink, std::span<const float> x, DType dt, std::vector<uint16_t>& chunk) {
  if (dt == DType::f32) return sink.write(std::as_bytes(x));
  for (size_t start = 0; start < x.size(); start += kConvertChunk) {
    const size_t n = std::min(kConvertChunk, x.size() - start);
    chunk.resize(n);
    for (size_t i = 0; i < n; ++i)
      chunk[i] = dt == DType::bf16 ? f32_to_bf16(x[start + i]) : f32_to_f16(x[start + i]);
    sink.write(std::as_bytes(std::span<const uint16_t>(chunk)));
  }
}
}  // namespace

std::string module_of(const std::string& weight_name) {
  return weight_name.substr(0, weight_name.size() - std::string_view(".weight").size());
}

std::string switch_mlp_module(const std::string& weight_name) {
  const size_t at = weight_name.find(".experts.");
  if (at == std::string::npos || !weight_name.ends_with(".weight")) return "";
  const size_t dot = weight_name.find('.', at + 9);
  if (dot == std::string::npos) return "";
  const std::string_view tail = std::string_view(weight_name).substr(dot + 1);  // "w1.weight"
  const std::string_view proj = tail == "w1.weight" || tail == "gate_proj.weight" ? "gate_proj"
                                : tail == "w3.weight" || tail == "up_proj.weight" ? "up_proj"
                                : tail == "w2.weight" || tail == "down_proj.weight" ? "down_proj"
                                                                                    : "";
  if (proj.empty()) return "";
  return fmt::format("{}.switch_mlp.{}", weight_name.substr(0, at), proj);
}

QuantizationPlan plan_quantization(const ModelConfig& cfg, QuantFormat format) {
  if (!quant_bits_supported(format.bits))
    throw InputError(kModelWriterComponent, fmt::format("{} bits is not supported (2, 4 or 8)", format.bits));
  if (format.group_size <= 0 || format.group_size % format.per_word() != 0)
    throw InputError(kModelWriterComponent, fmt::format("group size {} must be a positive multiple of {} at {} bits",
                                             format.group_size, format.per_word(), format.bits));
  QuantizationPlan plan;
  const ParamLayout layout(cfg);
  for (const ParamInfo& info : layout.params()) {
    if (!info.decay || info.shape.size() != 2) continue;  // Linear weights and embeddings only
    const int64_t input_dim = info.shape[1];
    if (input_dim % format.group_size == 0) {
      plan.quantized.insert(info.name);
    } else {
      plan.left_float.push_back(module_of(info.name));
      plan.left_float_input_dims.push_back(input_dim);
    }
  }
  if (plan.quantized.empty())
    throw InputError(kModelWriterComponent, fmt::format("group size {} divides no weight's input dimension (hidden_size {}, "
                                             "intermediate_size {}): nothing would be quantized; choose a group "
                                             "size that does (32, 64 or 128 usually)",
                                             format.group_size, cfg.dim, cfg.ffn_dim));
  return plan;
}

std::string describe_left_float(const QuantizationPlan& plan) {
  // Group "model.layers.3.mlp.down_proj" under "model.layers.{}.mlp.down_proj", in order.
  struct Group {
    std::string pattern;  // with {} where the layer index was, or the path itself
    std::vector<int64_t> layers;
    int64_t input_dim = 0;
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < plan.left_float.size(); ++i) {
    const std::string& path = plan.left_float[i];
    std::string pattern = path;
    int64_t layer = -1;
    constexpr std::string_view kLayers = "layers.";
    if (const size_t at = path.find(kLayers); at != std::string::npos) {
      const size_t begin = at + kLayers.size(), end = path.find('.', begin);
      const std::string digits = path.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
      if (!digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos) {
        layer = std::stoll(digits);
        pattern = path.substr(0, begin) + "{}" + (end == std::string::npos ? "" : path.substr(end));
      }
    }
    auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) { return g.pattern == pattern; });
    if (it == groups.end()) it = groups.insert(groups.end(), Group{pattern, {}, plan.left_float_input_dims[i]});
    if (layer >= 0) it->layers.push_back(layer);
  }
  // Then by input dimension: "input dimension 288: model.embed_tokens, model.layers.{0..5}.mlp.up_proj".
  std::vector<std::pair<int64_t, std::string>> by_dim;
  for (const Group& g : groups) {
    std::string layers;
    const auto& L = g.layers;
    if (L.size() == 1) {
      layers = std::to_string(L[0]);
    } else if (L.size() > 1) {
      const bool contiguous = L.back() - L.front() + 1 == static_cast<int64_t>(L.size());
      layers = contiguous ? fmt::format("{{{}..{}}}", L.front(), L.back()) : fmt::format("{{{}}}", fmt::join(L, ","));
    }
    std::string name = g.pattern;
    if (const size_t at = name.find("{}"); at != std::string::npos) name.replace(at, 2, layers);
    auto it = std::find_if(by_dim.begin(), by_dim.end(), [&](const auto& d) { return d.first == g.input_dim; });
    if (it == by_dim.end()) it = by_dim.insert(by_dim.end(), {g.input_dim, ""});
    it->second += (it->second.empty() ? "" : ", ") + name;
  }
  std::string out;
  for (const auto& [dim, names] : by_dim)
    out += fmt::format("{}input dimension {}: {}", out.empty() ? "" : "; ", dim, names);
  return out;
}

WeightSource random_init_source(const ModelConfig& cfg, uint64_t seed) {
  auto rng = std::make_shared<Rng>(seed);
  const float stddev = cfg.initializer_range;
  return [rng, stddev](const ParamInfo& info, std::span<float> out) {
    if (info.name.ends_with("norm.weight"))
      std::fill(out.begin(), out.end(), 1.0f);
    else if (info.name.ends_with(".bias"))
      std::fill(out.begin(), out.end(), 0.0f);
    else
      rng->fill_normal(out, 0.0f, stddev);
  };
}

DType parse_model_dtype(std::string_view name) {
  if (name == "float32" || name == "f32") return DType::f32;
  if (name == "float16" || name == "f16") return DType::f16;
  if (name == "bfloat16" || name == "bf16") return DType::bf16;
  throw InputError(kModelWriterComponent, fmt::format("dtype '{}' is not one of float32, float16, bfloat16", name));
}

std::string_view model_dtype_name(DType dt) {
  return dt == DType::f16 ? "float16" : dt == DType::bf16 ? "bfloat16" : "float32";
}

void write_model(const std::filesystem::path& dir, ModelConfig cfg, const ModelWriteOptions& options,
                 const WeightSource& source) {
  std::set<std::string> qnames;
  std::vector<std::string> left_float;  // modules whose weight stays float in a quantized model
  if (options.quantize) {
    if (options.quantized_weights) {
      qnames = *options.quantized_weights;
    } else {
      QuantizationPlan plan = plan_quantization(cfg, *options.quantize);
      qnames = std::move(plan.quantized);
    }
  }
  const ParamLayout layout(cfg);
  // Each spec: which tensor of the layout it comes from, and which part (0: the weight or
  // the packed words, 1: scales, 2: biases). A quantized MoE layer's experts are written
  // as mlx_lm holds them: each projection's experts stacked into one module
  // (switch_mlp_module), whose specs stand where its first expert's would, with the
  // expert axis first.
  std::vector<io::TensorSpec> specs;
  struct Part {
    size_t param = 0;   // the layout's tensor (a stack's: its first expert's)
    int part = 0;
    int64_t stack = -1;  // >= 0: stacks[stack]
  };
  std::vector<Part> part_of;
  std::vector<std::vector<size_t>> stacks;  // each stack's experts' tensors, by expert
  std::map<std::string, int64_t> stack_index;
  for (size_t i = 0; i < layout.params().size(); ++i) {
    const ParamInfo& info = layout.params()[i];
    if (!qnames.count(info.name)) {
      if (options.quantize && info.decay && info.shape.size() == 2) left_float.push_back(module_of(info.name));
      specs.push_back({info.name, options.dtype, info.shape});
      part_of.push_back({i, 0});
      continue;
    }
    const QuantFormat f = *options.quantize;
    if (info.shape.size() != 2 || info.shape[1] % f.group_size != 0)
      throw Error(kModelWriterComponent, fmt::format("{} of shape {} cannot be quantized with group size {}", info.name,
                                          io::format_shape(info.shape), f.group_size));
    const int64_t rows = info.shape[0], cols = info.shape[1];
    const std::string stack = cfg.is_moe() ? switch_mlp_module(info.name) : "";
    std::vector<int64_t> lead;
    if (!stack.empty()) {
      const auto [it, first] = stack_index.try_emplace(stack, static_cast<int64_t>(stacks.size()));
      if (!first) {
        stacks[static_cast<size_t>(it->second)].push_back(i);
        continue;
      }
      stacks.push_back({i});
      lead = {cfg.moe.num_experts};
    }
    auto shape = [&](int64_t per_row) {
      std::vector<int64_t> s = lead;
      s.insert(s.end(), {rows, per_row});
      return s;
    };
    const std::string m = stack.empty() ? module_of(info.name) : stack;
    specs.push_back({m + ".weight", DType::u32, shape(cols / f.per_word())});
    specs.push_back({m + ".scales", options.dtype, shape(cols / f.group_size)});
    specs.push_back({m + ".biases", options.dtype, shape(cols / f.group_size)});
    for (int part = 0; part < 3; ++part)
      part_of.push_back({i, part, stack.empty() ? -1 : static_cast<int64_t>(stacks.size()) - 1});
  }

  std::vector<float> tensor;         // the current tensor in float
  std::vector<uint32_t> packed;      // its packed words when quantized
  std::vector<std::byte> scales, biases;
  std::vector<uint16_t> chunk;
  auto write_tensor = [&](size_t index, io::TensorSink& sink) {
    const Part& at = part_of[index];
    const ParamInfo& info = layout.params()[at.param];
    const bool quantize = qnames.count(info.name) > 0;
    if (at.part == 0) {
      if (!quantize) {
        tensor.assign(static_cast<size_t>(info.numel), 0.0f);
        source(info, tensor);
        return write_float(sink, tensor, options.dtype, chunk);
      }
      // One matrix, or a stack's experts one after another: packed words out as they come,
      // scales and biases kept for the two tensors after.
      const std::vector<size_t> one = {at.param};
      const std::vector<size_t>& members = at.stack >= 0 ? stacks[static_cast<size_t>(at.stack)] : one;
      const QuantFormat f = *options.quantize;
      const int64_t rows = info.shape[0], cols = info.shape[1];
      const size_t group_bytes = static_cast<size_t>(rows * cols / f.group_size) * dtype_size(options.dtype);
      scales.assign(group_bytes * members.size(), std::byte{0});
      biases.assign(scales.size(), std::byte{0});
      for (size_t k = 0; k < members.size(); ++k) {
        const ParamInfo& member = layout.params()[members[k]];
        tensor.assign(static_cast<size_t>(member.numel), 0.0f);
        source(member, tensor);
        packed.assign(static_cast<size_t>(rows * cols / f.per_word()), 0u);
        kernels::quantize_rows(tensor.data(), rows, cols, f, options.dtype, packed.data(),
                               scales.data() + k * group_bytes, biases.data() + k * group_bytes);
        sink.write(std::as_bytes(std::span<const uint32_t>(packed)));
      }
      return;
    }
    sink.write(at.part == 1 ? std::span<const std::byte>(scales) : std::span<const std::byte>(biases));
  };
  io::write_safetensors_streamed(dir, specs, static_cast<uint64_t>(options.max_shard_bytes), write_tensor);

  cfg.torch_dtype = std::string(model_dtype_name(options.dtype));
  if (options.quantize) {
    // Modules left float are named `false`, as mlx_lm's per-module entries: readers that
    // go by the weights (a P.scales or not) and readers that go by the config agree.
    cfg.quantization = QuantizationConfig{*options.quantize, {}};
    for (const std::string& m : left_float) cfg.quantization->per_module[m] = std::nullopt;
  } else
    cfg.quantization.reset();
  write_file_atomic(dir / "config.json", cfg.to_json().dump(2) + "\n");
  log::debug("[{}] wrote {} ({} tensors, {} quantized)", kModelWriterComponent, dir.string(), specs.size(), qnames.size());
}

}  // namespace flotilla::model
