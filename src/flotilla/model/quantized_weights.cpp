// Llama's quantized weights: reading MLX-layout tensors as views, quantizing a float
// model in memory, and dequantizing a weight back to float.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/io/tensor_store.hpp"
#include "flotilla/kernels/quant.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/model/quantized_view.hpp"

namespace flotilla::model {
namespace {
constexpr std::string_view kQuantizedWeightsComponent = "model";
}  // namespace

// Checks P.weight / P.scales / P.biases of a quantized module against the float shape the
// config implies and the format config.json gives it; returns views into the store. With
// `stack` > 0 the module is mlx_lm's stack of `stack` experts (SwitchLinear: each tensor
// has that leading dimension) and the view is of expert `index`.
QuantMatrix quantized_view(const io::TensorStore& store, const std::string& m, int64_t rows, int64_t cols,
                           const ModelConfig& cfg, int64_t stack, int64_t index, bool check_values) {
  const std::string where = store.path().string();
  const std::optional<QuantFormat> f = cfg.quantization->for_module(m);
  if (!f)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: config.json says '{}' is not quantized, but {}.scales is present",
                                             where, m, m));
  const std::string weight_name = m + ".weight";
  const io::TensorEntry& w = store.info(weight_name);
  // The leading expert dimension first: a stack short of an expert (or of another model)
  // is named as such, not as a packing mismatch.
  std::vector<int64_t> lead;
  if (stack > 0) {
    lead = {stack};
    for (const io::TensorEntry* t : {&w, &store.info(m + ".scales"), &store.info(m + ".biases")})
      if (t->shape.size() != 3 || t->shape[0] != stack)
        throw InputError(kQuantizedWeightsComponent,
                         fmt::format("{}: {} has shape {}, but a stack of the config's {} experts needs a leading "
                                     "dimension of {} (mlx_lm's switch_mlp layout: (experts, out, in))",
                                     where, t->name, io::format_shape(t->shape), stack, stack));
  }
  auto stacked = [&](std::vector<int64_t> shape) {
    shape.insert(shape.begin(), lead.begin(), lead.end());
    return shape;
  };
  const io::TensorEntry& s = store.info(m + ".scales");
  const io::TensorEntry& b = store.info(m + ".biases");
  if (w.dtype != DType::u32)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {} is {}, but a quantized weight (it has .scales) must be U32 packed words",
                                             where, weight_name, dtype_name(w.dtype)));
  if (cols % f->group_size != 0)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: group_size {} from config.json does not divide the input dimension {} of {}",
                                             where, f->group_size, cols, weight_name));
  const std::vector<int64_t> packed_shape = stacked({rows, cols / f->per_word()});
  if (w.shape != packed_shape) {
    const int64_t last = w.shape.empty() ? 0 : w.shape.back();
    const std::string implied = w.shape.size() == packed_shape.size() && last > 0 && (last * 32) % cols == 0
                                    ? fmt::format(" (that shape means {} bits)", last * 32 / cols)
                                    : "";
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {} has packed shape {}{}, but bits = {} in config.json needs {} for a "
                                             "({}, {}) weight: the quantization config does not match the tensors",
                                             where, weight_name, io::format_shape(w.shape), implied, f->bits,
                                             io::format_shape(packed_shape), rows, cols));
  }
  const std::vector<int64_t> group_shape = stacked({rows, cols / f->group_size});
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
  const int64_t groups = rows * (cols / f->group_size);  // of this matrix (one expert of a stack)
  if (check_values) {
    store.check_finite(s, index * groups, groups);
    store.check_finite(b, index * groups, groups);
  }
  if (s.dtype != b.dtype)
    throw InputError(kQuantizedWeightsComponent, fmt::format("{}: {}.scales is {} but {}.biases is {}", where, m, dtype_name(s.dtype),
                                             m, dtype_name(b.dtype)));
  const size_t packed_bytes = static_cast<size_t>(rows * (cols / f->per_word())) * 4;
  const size_t group_bytes = static_cast<size_t>(rows * (cols / f->group_size)) * dtype_size(s.dtype);
  const auto e = static_cast<size_t>(index);
  return QuantMatrix{rows,
                     cols,
                     *f,
                     s.dtype,
                     w.bytes.data() + e * packed_bytes,
                     s.bytes.data() + e * group_bytes,
                     b.bytes.data() + e * group_bytes};
}

QuantMatrix quantized_view(const io::TensorStore& store, const ParamInfo& info, const ModelConfig& cfg,
                           bool check_values) {
  return quantized_view(store, module_of(info.name), info.shape[0], info.shape[1], cfg, 0, 0, check_values);
}

Llama Llama::with_quantized(const ModelConfig& cfg, const std::set<std::string>& quantized) {
  return Llama(cfg, quantized);
}

void Llama::add_quantized_matrix(const QuantMatrix& m, std::shared_ptr<const void> keep_alive, bool mapped) {
  const auto slot = static_cast<int64_t>(qweights_.size());
  const auto params = layout_.params();
  const auto info = std::find_if(params.begin(), params.end(),
                                 [&](const ParamInfo& p) { return p.quantized && p.quant_slot == slot; });
  if (info == params.end())
    throw Error(kQuantizedWeightsComponent, fmt::format("add_quantized_matrix: the model has {} quantized slots", slot));
  if (info->shape != std::vector<int64_t>{m.rows, m.cols})
    throw Error(kQuantizedWeightsComponent, fmt::format("add_quantized_matrix: {} is ({}, {}), not the layout's shape",
                                                        info->name, m.rows, m.cols));
  qweights_.push_back(m);
  if (keep_alive && (qstorage_.empty() || qstorage_.back() != keep_alive)) qstorage_.push_back(std::move(keep_alive));
  qweights_mapped_ = qweights_mapped_ || mapped;
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

namespace {
// A matrix's three tensors in the packed arena, each from a word boundary: their byte
// sizes, and the words each takes.
struct QuantParts {
  std::array<int64_t, 3> bytes{};  // packed, scales, biases
  int64_t words(size_t i) const { return (bytes[i] + 3) / 4; }
  int64_t total_words() const { return words(0) + words(1) + words(2); }
};
QuantParts quant_parts(const QuantMatrix& m) {
  const int64_t group_bytes = m.rows * m.groups_per_row() * static_cast<int64_t>(dtype_size(m.scale_dtype));
  return {{m.rows * m.words_per_row() * 4, group_bytes, group_bytes}};
}
}  // namespace

std::vector<ElementRange> Llama::packed_places() const {
  std::vector<ElementRange> places;
  int64_t at = 0;
  for (const QuantMatrix& m : qweights_) {
    places.push_back({at, at + quant_parts(m).total_words()});
    at = places.back().end;
  }
  return places;
}

std::span<float> Llama::own_quantized(std::span<const ElementRange> ranges) {
  const std::vector<ElementRange> places = packed_places();
  const int64_t words = places.empty() ? 0 : places.back().end;
  const std::vector<ElementRange> all = {{0, words}};
  if (ranges.empty()) ranges = all;
  auto arena = std::make_shared<Buffer<float>>(static_cast<size_t>(words));
  auto* base = reinterpret_cast<std::byte*>(arena->data());
  for (size_t slot = 0; slot < qweights_.size(); ++slot) {
    QuantMatrix& m = qweights_[slot];
    const QuantParts parts = quant_parts(m);
    const std::array<const std::byte*, 3> from = {m.packed, m.scales, m.biases};
    std::array<const std::byte*, 3> to{};
    int64_t at = places[slot].begin;  // in words
    for (size_t i = 0; i < 3; ++i) {
      to[i] = base + at * 4;
      // The words of this part inside the ranges, copied from the source's bytes.
      const int64_t end = at + parts.words(i);
      for (const ElementRange& r : ranges) {
        const int64_t b = std::max(r.begin, at), e = std::min(r.end, end);
        if (b >= e) continue;
        const int64_t first = (b - at) * 4, last = std::min((e - at) * 4, parts.bytes[i]);
        if (last > first)
          std::memcpy(base + b * 4, from[i] + first, static_cast<size_t>(last - first));
      }
      // A mapped file's pages of this part (the ones just read, and the scales and biases
      // the load checked) leave the resident set now, not when the whole base is copied.
      if (qweights_mapped_) drop_file_pages(from[i], static_cast<size_t>(parts.bytes[i]));
      at = end;
    }
    m.packed = to[0];
    m.scales = to[1];
    m.biases = to[2];
  }
  qstorage_.clear();  // the mapped files
  qstorage_.push_back(arena);
  qweights_mapped_ = false;
  return arena->span();
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
