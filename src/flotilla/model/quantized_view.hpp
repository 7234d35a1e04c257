// Views of a model directory's quantized matrices (MLX layout, tensor/quant.hpp), checked
// against the shape the config implies (model/quantized_weights.cpp): what Llama::load and
// a tensor-parallel rank's load (model/tensor_parallel_io.cpp) read quantized weights with.
#pragma once

#include <cstdint>
#include <string>

#include "flotilla/io/tensor_store.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/params.hpp"
#include "flotilla/tensor/quant.hpp"

namespace flotilla::model {

// The packed matrix of module `module` ((rows, cols) as a float weight) viewed in the
// store's mapped files, its three tensors' shapes and dtypes checked against config.json's
// format for it (InputError naming the tensor otherwise). `stack` > 0: mlx_lm's stack of
// that many experts, the view of expert `index`. `check_values`: the scales and biases are
// scanned for NaN and Inf (the store's policy); false leaves their pages unread, for a
// caller that checks only the part it keeps.
QuantMatrix quantized_view(const io::TensorStore& store, const std::string& module, int64_t rows, int64_t cols,
                           const ModelConfig& cfg, int64_t stack, int64_t index, bool check_values = true);
QuantMatrix quantized_view(const io::TensorStore& store, const ParamInfo& info, const ModelConfig& cfg,
                           bool check_values = true);

}  // namespace flotilla::model
