#include "flotilla/model/tensor_parallel.hpp"

#include <fmt/format.h>

#include <algorithm>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::model {

ModelConfig tensor_parallel_config(const ModelConfig& full, int tp) {
  if (tp < 1) throw InputError("model", fmt::format("tp={} is not a positive number of ranks", tp));
  if (full.is_moe())
    throw InputError("model", fmt::format("tensor parallelism (tp={}) does not split a mixture of experts' layers "
                                          "yet: use ep for the experts",
                                          tp));
  auto divides = [&](int64_t n, const char* what) {
    if (n % tp != 0)
      throw InputError("model", fmt::format("tp={} does not divide the model's {} {} (tensor parallelism splits "
                                            "them evenly over the tp ranks)",
                                            tp, n, what));
  };
  divides(full.n_heads, "attention heads");
  divides(full.n_kv_heads, "key-value heads");
  divides(full.ffn_dim, "MLP width (intermediate_size)");
  ModelConfig local = full;
  local.n_heads = full.n_heads / tp;
  local.n_kv_heads = full.n_kv_heads / tp;
  local.ffn_dim = full.ffn_dim / tp;
  return local;  // head_dim stays: a head is never cut
}

TensorSlice tensor_slice(const ParamInfo& full, const ParamInfo& local) {
  if (full.shape == local.shape) return TensorSlice::replicated;
  if (full.shape.size() == local.shape.size() && full.shape[0] != local.shape[0] &&
      (full.shape.size() == 1 || full.shape[1] == local.shape[1]))
    return TensorSlice::rows;
  if (full.shape.size() == 2 && local.shape.size() == 2 && full.shape[0] == local.shape[0])
    return TensorSlice::columns;
  throw Error("model", fmt::format("tensor {}: a local shape that is no slice of the full one", full.name));
}

std::vector<ElementRange> slice_ranges(const ParamInfo& full, const ParamInfo& local, int rank) {
  const auto r = static_cast<int64_t>(rank);
  switch (tensor_slice(full, local)) {
    case TensorSlice::replicated:
      return {{full.offset, full.offset + full.numel}};
    case TensorSlice::rows:
      return {{full.offset + r * local.numel, full.offset + (r + 1) * local.numel}};
    case TensorSlice::columns: {
      const int64_t rows = full.shape[0], in = full.shape[1], cols = local.shape[1];
      std::vector<ElementRange> ranges;
      ranges.reserve(static_cast<size_t>(rows));
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t b = full.offset + i * in + r * cols;
        ranges.push_back({b, b + cols});
      }
      return ranges;
    }
  }
  return {};
}

namespace {
// fn(full_begin, local_begin, n) for each run of the slice, in order.
template <class Fn>
void for_each_run(const ParamInfo& full, const ParamInfo& local, int rank, Fn&& fn) {
  int64_t at = local.offset;
  for (const ElementRange& r : slice_ranges(full, local, rank)) {
    fn(r.begin, at, r.size());
    at += r.size();
  }
}

const ParamInfo& local_of(const ParamTable& local, const ParamInfo& full) {
  const ParamInfo* info = local.find(full.name);
  if (!info) throw Error("model", fmt::format("tensor {} has no tensor-parallel counterpart", full.name));
  return *info;
}
}  // namespace

void copy_slice_out(const ParamInfo& full, const ParamInfo& local, int rank, std::span<const float> full_values,
                    std::span<float> local_values) {
  for_each_run(full, local, rank, [&](int64_t f, int64_t l, int64_t n) {
    std::copy_n(full_values.begin() + f, n, local_values.begin() + l);
  });
}

void copy_slice_in(const ParamInfo& full, const ParamInfo& local, int rank, std::span<const float> local_values,
                   std::span<float> full_values) {
  for_each_run(full, local, rank, [&](int64_t f, int64_t l, int64_t n) {
    std::copy_n(local_values.begin() + l, n, full_values.begin() + f);
  });
}

void init_random_slices(Llama& local, const ModelConfig& full, int rank, uint64_t seed) {
  // Llama::init_random's stream over the full layout (the same rules: norms 1, biases 0,
  // everything else N(0, initializer_range), one stream in layout order, two words a draw),
  // drawn only inside the slices and skipped elsewhere.
  const ParamLayout full_layout(full);
  const std::span<float> params = local.params();
  Rng rng(seed);
  for (const ParamInfo& info : full_layout.params()) {
    const ParamInfo& mine = local_of(local.layout(), info);
    const bool is_norm = info.name.ends_with("norm.weight");
    const bool is_bias = info.name.ends_with(".bias");
    int64_t drawn = info.offset;  // the stream stands at this float of the tensor
    for_each_run(info, mine, rank, [&](int64_t f, int64_t l, int64_t n) {
      std::span<float> w = params.subspan(static_cast<size_t>(l), static_cast<size_t>(n));
      if (is_norm) {
        std::fill(w.begin(), w.end(), 1.0f);
      } else if (is_bias) {
        std::fill(w.begin(), w.end(), 0.0f);
      } else {
        rng.discard(2 * static_cast<uint64_t>(f - drawn));
        rng.fill_normal(w, 0.0f, full.initializer_range);
        drawn = f + n;
      }
    });
    if (!is_norm && !is_bias) rng.discard(2 * static_cast<uint64_t>(info.offset + info.numel - drawn));
  }
}

void take_slices(Llama& local, const Llama& full, int rank) {
  const std::span<float> params = local.params();
  for (const ParamInfo& info : full.layout().params())
    copy_slice_out(info, local_of(local.layout(), info), rank, full.params(), params);
}

}  // namespace flotilla::model

namespace flotilla::model {

void Llama::set_tensor_parallel(TensorParallelGroup* group, const ModelConfig& full) {
  if (group && group->tp_size() > 1) {
    if (quantized())
      throw InputError("model", fmt::format("tensor parallelism (tp={}) does not split quantized (4-bit) weights yet",
                                            group->tp_size()));
    if (cfg_.to_json() != tensor_parallel_config(full, group->tp_size()).to_json())
      throw Error("model", "set_tensor_parallel: this model is not the tp rank's slice of the full config");
  }
  tp_ = group && group->tp_size() > 1 ? group : nullptr;
  tp_full_ = full;
}

double Llama::grad_sum_squares_tensor_parallel() {
  const Trainable t = trainable();
  if (!tp_) return kernels::sum_squares(t.grads.data(), static_cast<int64_t>(t.grads.size()));
  if (lora_) {
    // LoRA on column-parallel layers: each B holds this rank's output rows, each A is whole.
    double replicated = 0.0;
    std::vector<double> split(1, 0.0);
    for (const ParamInfo& info : t.table.params()) {
      const double s = kernels::sum_squares(t.grads.data() + info.offset, info.numel);
      (info.name.ends_with(".lora_B.weight") ? split[0] : replicated) += s;
    }
    tp_->all_reduce_sum(std::span<double>(split), "tp gradient norm");
    return replicated + split[0];
  }
  const ParamLayout full(tp_full_);
  double replicated = 0.0;
  std::vector<double> split(1, 0.0);
  for (const ParamInfo& info : full.params()) {
    const ParamInfo& mine = local_of(layout_, info);
    const double s = kernels::sum_squares(t.grads.data() + mine.offset, mine.numel);
    (tensor_slice(info, mine) == TensorSlice::replicated ? replicated : split[0]) += s;
  }
  tp_->all_reduce_sum(std::span<double>(split), "tp gradient norm");
  return replicated + split[0];
}

}  // namespace flotilla::model
