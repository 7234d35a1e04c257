// Llama's quantized weights: reading MLX-layout tensors as views, quantizing a float
// model in memory, and dequantizing a weight back to float.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/io/tensor_store.hpp"
#include "flotilla/kernels/quant.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/model_writer.hpp"

namespace flotilla::model {
namespace {
constexpr std::string_view kQuantizedWeightsComponent = "model";
}  // namespace

// Checks P.weight / P.scales / P.biases of a quantized module against the float shape the
// config implies and the format config.json gives it; returns views into the store.
QuantMatrix quantized_view(const io::TensorStore& store, const ParamInfo& info, const ModelConfig& cfg) {
  const std::string m = module_of(info.name);
  const std::string where = store.path().string();
  const std::optional<QuantFormat> f = cfg.quantization->for_module(m);
  if (!f)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: config.json says '{}' is not quantized, but {}.scales is present",
                                             where, m, m));
  const int64_t rows = info.shape[0], cols = info.shape[1];
  const io::TensorEntry& w = store.info(info.name);
  const io::TensorEntry& s = store.info(m + ".scales");
  const io::TensorEntry& b = store.info(m + ".biases");
  if (w.dtype != DType::u32)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {} is {}, but a quantized weight (it has .scales) must be U32 packed words",
                                             where, info.name, dtype_name(w.dtype)));
  if (cols % f->group_size != 0)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: group_size {} from config.json does not divide the input dimension {} of {}",
                                             where, f->group_size, cols, info.name));
  const std::vector<int64_t> packed_shape = {rows, cols / f->per_word()};
  if (w.shape != packed_shape) {
    const std::string implied = w.shape.size() == 2 && w.shape[1] > 0 && (w.shape[1] * 32) % cols == 0
                                    ? fmt::format(" (that shape means {} bits)", w.shape[1] * 32 / cols)
                                    : "";
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {} has packed shape {}{}, but bits = {} in config.json needs {} for a "
                                             "({}, {}) weight: the quantization config does not match the tensors",
                                             where, info.name, io::format_shape(w.shape), implied, f->bits,
                                             io::format_shape(packed_shape), rows, cols));
  }
  const std::vector<int64_t> group_shape = {rows, cols / f->group_size};
  for (const io::TensorEntry* t : {&s, &b}) {
    if (t->shape != group_shape)
      throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {} has shape {}, but group_size = {} in config.json needs {}: the "
                                               "quantization config does not match the tensors",
                                               where, t->name, io::format_shape(t->shape), f->group_size,
                                               io::format_shape(group_shape)));
    if (t->dtype != DType::f16 && t->dtype != DType::bf16 && t->dtype != DType::f32)
      throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {} is {} (F16, BF16 or F32 expected)", where, t->name,
                                               dtype_name(t->dtype)));
  }
  store.check_finite(s);
  store.check_finite(b);
  if (s.dtype != b.dtype)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {}.scales is {} but {}.biases is {}", where, m, dtype_name(s.dtype),
                                             m, dtype_name(b.dtype)));
  return QuantMatrix{rows, cols, *f, s.dtype, w.bytes.data(), s.bytes.data(), b.bytes.data()};
}

void Llama::weight_f32(const ParamInfo& info, std::span<float> out) const {
  if (info.quantized) {
    const QuantMatrix& m = quantized_weight(info.ref());
    if (static_cast<int64_t>(out.size()) != m.rows * m.cols) throw Error(kQuantizedWeightsComponent, "weight_f32: wrong size");
    return kernels::dequantize_rows(m, 0, m.rows, out.data());
  }
  if (static_cast<int64_t>(out.size()) != info.numel) throw Error(kQuantizedWeightsComponent, "weight_f32: wrong size");
  std::copy_n(params_.data() + info.offset, info.numel, out.data());
}

Llama Llama::quantize(QuantFormat format, DType scale_dtype) const {
  if (quantized()) throw InputError(kQuantizedWeightsComponent, "the model is already quantized");
  ModelConfig qcfg = cfg_;
  QuantizationPlan plan = plan_quantization(cfg_, format);
  qcfg.quantization = QuantizationConfig{format, {}};
  for (const std::string& m : plan.left_float) qcfg.quantization->per_module[m] = std::nullopt;
  Llama q(qcfg, plan.quantized);
  const size_t esz = dtype_size(scale_dtype);
  for (const ParamInfo& info : q.layout_.params()) {
    const ParamInfo* src = layout_.find(info.name);
    if (!info.quantized) {
      std::copy_n(params_.data() + src->offset, info.numel, q.params_.data() + info.offset);
      continue;
    }
    const int64_t rows = info.shape[0], cols = info.shape[1];
    const size_t packed_bytes = static_cast<size_t>(rows * cols / format.per_word()) * 4;
    const size_t group_bytes = static_cast<size_t>(rows * cols / format.group_size) * esz;
    // One owned buffer per matrix: packed words, then scales, then biases.
    auto bytes = std::make_shared<std::vector<std::byte>>(packed_bytes + 2 * group_bytes);
    std::byte* base = bytes->data();
    kernels::quantize_rows(params_.data() + src->offset, rows, cols, format, scale_dtype,
                           reinterpret_cast<uint32_t*>(base), base + packed_bytes, base + packed_bytes + group_bytes);
    q.qweights_.push_back(
        QuantMatrix{rows, cols, format, scale_dtype, base, base + packed_bytes, base + packed_bytes + group_bytes});
    q.qstorage_.push_back(std::move(bytes));
  }
  return q;
}

}  // namespace flotilla::model
