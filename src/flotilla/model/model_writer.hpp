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

#include "flotilla/model/config.hpp"
#include "flotilla/model/params.hpp"
#include "flotilla/tensor/quant.hpp"

namespace flotilla::model {

// The weights that `convert --quantize` stores quantized: every Linear weight and the
// embeddings (lm_head too when untied), as mlx_lm.convert -q does; norms and biases stay
// float. InputError when the group size does not divide an input dimension or the packing.
std::set<std::string> quantizable_weights(const ModelConfig& cfg, QuantFormat format);

struct ModelWriteOptions {
  DType dtype = DType::f32;                // float tensors, and the scales and biases
  std::optional<QuantFormat> quantize;     // nullopt: a float model
  int64_t max_shard_bytes = int64_t{5} << 30;
};

// Fills `out` (numel of info.shape, float32) with the tensor `info` of the model written.
using WeightSource = std::function<void(const ParamInfo& info, std::span<float> out)>;

// Writes config.json (with "quantization" when quantizing, torch_dtype = options.dtype)
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
