// Writing model directories tensor by tensor, float or quantized (MLX's layout), so that
// `init`, `convert` and `fuse` never hold more than one tensor in float: a 7B model is
// generated, converted or quantized on a machine that could not hold it in float32.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "flotilla/model/config.hpp"
#include "flotilla/model/params.hpp"
#include "flotilla/tensor/quant.hpp"

namespace flotilla::model {

// Which weights `convert --quantize` stores quantized: every Linear weight and the
// embeddings (lm_head too when untied) whose input dimension the group size divides, as
// mlx_lm.convert -q does (its predicate skips a layer with weight.shape[-1] % group_size);
// the others stay float, as norms and biases do, and are named in `left_float` so that the
// caller can say which. InputError for unsupported bits, a group size that is not whole
// words, or one that divides no weight's input dimension (nothing would be quantized).
// The module a weight belongs to: "model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj"
// (the name a quantized module's .weight / .scales / .biases share, and config.json's key).
std::string module_of(const std::string& weight_name);
// mlx_lm's stacked module (SwitchGLU) an expert's weight belongs to:
// "model.layers.1.block_sparse_moe.experts.2.w1.weight" -> "model.layers.1.block_sparse_moe.switch_mlp.gate_proj"
// (Qwen2-MoE's "mlp.experts.2.gate_proj.weight" -> "mlp.switch_mlp.gate_proj"); "" for any
// other tensor. Its .weight, .scales and .biases hold every expert's, the expert axis first.
std::string switch_mlp_module(const std::string& weight_name);

struct QuantizationPlan {
  std::set<std::string> quantized;      // weight names, e.g. "model.layers.0.mlp.up_proj.weight"
  std::vector<std::string> left_float;  // module paths, e.g. "model.layers.0.mlp.down_proj"
  std::vector<int64_t> left_float_input_dims;  // (left_float.size(),) the dimension not divided
};
QuantizationPlan plan_quantization(const ModelConfig& cfg, QuantFormat format);

// The modules a plan leaves float, for a person: "input dimension 288: model.embed_tokens,
// model.layers.{0..5}.self_attn.q_proj, ..." (layers as a range or a list).
std::string describe_left_float(const QuantizationPlan& plan);

struct ModelWriteOptions {
  DType dtype = DType::f32;                // float tensors, and the scales and biases
  std::optional<QuantFormat> quantize;     // nullopt: a float model
  // With `quantize`: the weights stored quantized. nullopt: plan_quantization's choice;
  // fuse passes the base's own set, so a mixed base stays mixed the same way.
  std::optional<std::set<std::string>> quantized_weights;
  int64_t max_shard_bytes = int64_t{5} << 30;
};

// Fills `out` (numel of info.shape, float32) with the tensor `info` of the model written.
using WeightSource = std::function<void(const ParamInfo& info, std::span<float> out)>;

// Writes config.json (with "quantization" when quantizing, a `false` entry for each module
// left float, as mlx_lm's per-module entries read; torch_dtype = options.dtype)
// and the safetensors weights of `cfg` into `dir` (which must exist), asking `source` for
// each tensor in layout order. Peak memory: one tensor in float plus its packed form.
void write_model(const std::filesystem::path& dir, ModelConfig cfg, const ModelWriteOptions& options,
                 const WeightSource& source);

// Llama::init_random's values, produced tensor by tensor: the same seed gives the same model
// as init_random, provided the tensors are asked for in layout order (write_model does).
WeightSource random_init_source(const ModelConfig& cfg, uint64_t seed);

// "float16" / "bfloat16" / "float32" <-> DType; InputError otherwise.
DType parse_model_dtype(std::string_view name);
std::string_view model_dtype_name(DType dt);

}  // namespace flotilla::model
