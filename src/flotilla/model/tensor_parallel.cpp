#include "flotilla/model/tensor_parallel.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::model {

namespace {
// Where tp rank `at`'s share of n things starts: the balanced split, r n / tp (exactly
// r (n / tp) when tp divides n).
int64_t split_begin(int64_t n, TpRank at) { return n * at.rank / at.size; }
}  // namespace

VocabShard vocab_shard(int64_t vocab_size, TpRank at) {
  if (vocab_size < at.size)
    throw InputError("model", fmt::format("tp={} is more ranks than the model's {} vocabulary rows (each tensor-parallel "
                                          "rank holds a slice of the embedding and lm_head)",
                                          at.size, vocab_size));
  return {split_begin(vocab_size, at), split_begin(vocab_size, {at.rank + 1, at.size})};
}

ModelConfig tensor_parallel_config(const ModelConfig& full, TpRank at) {
  const int tp = at.size;
  if (tp < 1 || at.rank < 0 || at.rank >= tp)
    throw InputError("model", fmt::format("tp={} is not a positive number of ranks (or {} is not one of them)", tp,
                                          at.rank));
  auto divides = [&](int64_t n, const char* what) {
    if (n % tp != 0)
      throw InputError("model", fmt::format("tp={} does not divide the model's {} {} (tensor parallelism splits "
                                            "them evenly over the tp ranks)",
                                            tp, n, what));
  };
  divides(full.n_heads, "attention heads");
  divides(full.n_kv_heads, "key-value heads");
  divides(full.ffn_dim, "MLP width (intermediate_size)");
  if (full.quantization && full.is_moe() && tp > 1)
    // Untested: a 4-bit mixture's experts are mlx_lm's stacks (SwitchLinear), which
    // slice_quantized and the sliced directory read have not been taught.
    throw InputError("model", fmt::format("tensor parallelism (tp={}) does not split a 4-bit mixture of experts yet: "
                                          "train it at tp=1, or convert it to a float model first",
                                          tp));
  if (full.quantization && tp > 1) {
    // A row-parallel layer (o, down) is cut along its input columns, where a quantized
    // matrix's groups run: each rank's share must be whole groups (slice_quantized).
    for (int64_t l = 0; l < full.n_layers; ++l)
      for (const auto& [module, in] : {std::pair<std::string, int64_t>{fmt::format("model.layers.{}.self_attn.o_proj", l),
                                                                       full.q_dim()},
                                       {fmt::format("model.layers.{}.mlp.down_proj", l), full.ffn_dim}}) {
        const std::optional<QuantFormat> f = full.quantization->for_module(module);
        if (f && (in / tp) % f->group_size != 0)
          throw InputError("model", fmt::format("tensor parallelism (tp={}) gives each rank {} of {}.weight's {} input "
                                                "columns, not a whole number of its quantization groups of {}: choose "
                                                "a tp, or a group size (flotilla convert --group-size), that makes "
                                                "each rank's share a multiple of the group size",
                                                tp, in / tp, module, in, f->group_size));
      }
  }
  // A mixture of experts (Megatron's way for experts): every expert split as a dense MLP
  // (gate and up by output rows, down by input columns), the shared expert too; the router
  // and the shared expert's gate are replicated, so every tp rank routes alike.
  if (full.is_moe()) {
    divides(full.moe.expert_ffn_dim, "expert MLP width (each expert's intermediate size)");
    if (full.moe.shared_expert_ffn_dim > 0) divides(full.moe.shared_expert_ffn_dim, "shared expert MLP width");
  }
  ModelConfig local = full;
  local.n_heads = full.n_heads / tp;
  local.n_kv_heads = full.n_kv_heads / tp;
  local.ffn_dim = full.ffn_dim / tp;
  local.moe.expert_ffn_dim = full.moe.expert_ffn_dim / tp;
  local.moe.shared_expert_ffn_dim = full.moe.shared_expert_ffn_dim / tp;
  local.vocab_size = vocab_shard(full.vocab_size, at).size();
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

std::vector<ElementRange> slice_ranges(const ParamInfo& full, const ParamInfo& local, TpRank at) {
  switch (tensor_slice(full, local)) {
    case TensorSlice::replicated:
      return {{full.offset, full.offset + full.numel}};
    case TensorSlice::rows: {
      // The balanced split of the rows: equal shares for heads and MLP columns, shares that
      // differ by one row for a vocabulary tp does not divide.
      const int64_t row_numel = full.numel / full.shape[0];
      const int64_t b = full.offset + split_begin(full.shape[0], at) * row_numel;
      return {{b, b + local.numel}};
    }
    case TensorSlice::columns: {
      const int64_t rows = full.shape[0], in = full.shape[1], cols = local.shape[1];
      const int64_t first = split_begin(in, at);
      std::vector<ElementRange> ranges;
      ranges.reserve(static_cast<size_t>(rows));
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t b = full.offset + i * in + first;
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
void for_each_run(const ParamInfo& full, const ParamInfo& local, TpRank rank, Fn&& fn) {
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

void copy_slice_out(const ParamInfo& full, const ParamInfo& local, TpRank rank, std::span<const float> full_values,
                    std::span<float> local_values) {
  for_each_run(full, local, rank, [&](int64_t f, int64_t l, int64_t n) {
    std::copy_n(full_values.begin() + f, n, local_values.begin() + l);
  });
}

void copy_slice_in(const ParamInfo& full, const ParamInfo& local, TpRank rank, std::span<const float> local_values,
                   std::span<float> full_values) {
  for_each_run(full, local, rank, [&](int64_t f, int64_t l, int64_t n) {
    std::copy_n(local_values.begin() + l, n, full_values.begin() + f);
  });
}

void for_each_slice_piece(const ParamInfo& full, const ParamInfo& local, TpRank at, std::span<const ElementRange> shard,
                          const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  for_each_run(full, local, at, [&](int64_t f, int64_t l, int64_t n) {
    if (shard.empty()) {
      fn(f, l, n);
      return;
    }
    // The shard's ranges that reach past the run's start, while they begin before its end.
    auto r = std::partition_point(shard.begin(), shard.end(), [&](const ElementRange& x) { return x.end <= l; });
    for (; r != shard.end() && r->begin < l + n; ++r) {
      const int64_t b = std::max(r->begin, l), e = std::min(r->end, l + n);
      if (b < e) fn(f + (b - l), b, e - b);
    }
  });
}

void init_random_slices(Llama& local, const ModelConfig& full, TpRank rank, uint64_t seed,
                        std::span<const ElementRange> shard) {
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
    if (!local.holds(mine)) {  // another pipeline stage's (hold_only): its draws skipped
      if (!is_norm && !is_bias) rng.discard(2 * static_cast<uint64_t>(info.numel));
      continue;
    }
    int64_t drawn = info.offset;  // the stream stands at this float of the tensor
    for_each_slice_piece(info, mine, rank, shard, [&](int64_t f, int64_t l, int64_t n) {
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

SequenceShard sequence_shard(int64_t tokens, TpRank at) {
  SequenceShard s;
  s.size = at.size;
  s.rows = (tokens + at.size - 1) / at.size;
  s.begin = at.rank * s.rows;
  s.real = std::clamp<int64_t>(tokens - s.begin, 0, s.rows);
  return s;
}

SquareSums square_sums(const float* values, int64_t begin, int64_t end, std::span<const ElementRange> split) {
  SquareSums sums;
  int64_t at = begin;  // the first float not yet counted
  const auto first = std::partition_point(split.begin(), split.end(), [&](const ElementRange& r) { return r.end <= begin; });
  for (auto it = first; it != split.end() && it->begin < end; ++it) {
    const int64_t b = std::max(it->begin, begin), e = std::min(it->end, end);
    if (at < b) sums.replicated += kernels::sum_squares(values + (at - begin), b - at);
    sums.split += kernels::sum_squares(values + (b - begin), e - b);
    at = e;
  }
  if (at < end) sums.replicated += kernels::sum_squares(values + (at - begin), end - at);
  return sums;
}

void take_slices(Llama& local, const Llama& full, TpRank rank) {
  const std::span<float> params = local.params();
  for (const ParamInfo& info : full.layout().params()) {
    if (info.quantized) throw Error("model", "take_slices of a quantized model: use Llama::tensor_parallel_slice");
    copy_slice_out(info, local_of(local.layout(), info), rank, full.params(), params);
  }
}

QuantSlice slice_quantized(const QuantMatrix& full, const ParamInfo& full_info, const ParamInfo& local_info,
                           TpRank at) {
  const auto rows = static_cast<int64_t>(local_info.shape.at(0)), cols = static_cast<int64_t>(local_info.shape.at(1));
  const auto esz = static_cast<int64_t>(dtype_size(full.scale_dtype));
  QuantMatrix m = full;
  m.rows = rows;
  m.cols = cols;
  switch (tensor_slice(full_info, local_info)) {
    case TensorSlice::replicated:
      return {full, nullptr};
    case TensorSlice::rows: {
      // Rows [r0, r0 + rows): contiguous in the packed words, the scales and the biases.
      const int64_t r0 = split_begin(full.rows, at);
      m.packed = full.packed + r0 * full.words_per_row() * 4;
      m.scales = full.scales + r0 * full.groups_per_row() * esz;
      m.biases = full.biases + r0 * full.groups_per_row() * esz;
      return {m, nullptr};
    }
    case TensorSlice::columns: {
      // Columns [c0, c0 + cols) of every row: words [c0 / per_word, ...) and groups
      // [c0 / group_size, ...) of it, when both fall on whole groups (and so whole words).
      const int64_t c0 = split_begin(full.cols, at), gs = full.format.group_size, per_word = full.format.per_word();
      if (c0 % gs != 0 || cols % gs != 0 || gs % per_word != 0)
        throw InputError("model", fmt::format("tensor parallelism (tp={}) gives each rank {} of {}'s {} input columns, "
                                              "not a whole number of its quantization groups of {}",
                                              at.size, cols, full_info.name, full.cols, gs));
      const int64_t words = cols / per_word, groups = cols / gs;
      const int64_t packed_bytes = rows * words * 4, group_bytes = rows * groups * esz;
      auto owned = std::make_shared<std::vector<std::byte>>(static_cast<size_t>(packed_bytes + 2 * group_bytes));
      std::byte* packed = owned->data();
      std::byte* scales = packed + packed_bytes;
      std::byte* biases = scales + group_bytes;
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(packed + r * words * 4, full.packed + (r * full.words_per_row() + c0 / per_word) * 4,
                    static_cast<size_t>(words * 4));
        const int64_t g = (r * full.groups_per_row() + c0 / gs) * esz;
        std::memcpy(scales + r * groups * esz, full.scales + g, static_cast<size_t>(groups * esz));
        std::memcpy(biases + r * groups * esz, full.biases + g, static_cast<size_t>(groups * esz));
      }
      m.packed = packed;
      m.scales = scales;
      m.biases = biases;
      return {m, std::move(owned)};
    }
  }
  return {full, nullptr};
}

}  // namespace flotilla::model

namespace flotilla::model {

Llama Llama::tensor_parallel_slice(TpRank at) const {
  std::set<std::string> quantized;
  for (const ParamInfo& info : layout_.params())
    if (info.quantized) quantized.insert(info.name);
  Llama local(tensor_parallel_config(cfg_, at), quantized);
  // Row slices view this model's bytes: the local model keeps them alive too.
  local.qstorage_ = qstorage_;
  for (const ParamInfo& info : layout_.params()) {
    const ParamInfo& mine = local_of(local.layout_, info);
    if (!info.quantized) {
      copy_slice_out(info, mine, at, params(), local.params());
      continue;
    }
    QuantSlice slice = slice_quantized(qweights_[static_cast<size_t>(info.quant_slot)], info, mine, at);
    const bool view = slice.owned == nullptr;
    local.add_quantized_matrix(slice.matrix, std::move(slice.owned), view && qweights_mapped_);
  }
  return local;
}

void Llama::set_tensor_parallel(TensorParallelGroup* group, const ModelConfig& full) {
  if (group && group->tp_size() > 1) {
    const TpRank at{group->tp_rank(), group->tp_size()};
    if (cfg_.to_json() != tensor_parallel_config(full, at).to_json())
      throw Error("model", "set_tensor_parallel: this model is not the tp rank's slice of the full config");
    vocab_ = vocab_shard(full.vocab_size, at);
  }
  tp_ = group && group->tp_size() > 1 ? group : nullptr;
  tp_full_ = full;
  logits_valid_ = have_targets_ = false;
  if (sequence_parallel_) drop_activation_plan();  // the plan's row counts depend on the group
}

void Llama::set_sequence_parallel(bool on) {
  if (on == sequence_parallel_) return;
  sequence_parallel_ = on;
  drop_activation_plan();
}

int64_t Llama::vocab_parallel_cross_entropy(const int32_t* targets, int64_t N) {
  // loss = log(sum_j exp(x_j - max)) - (x_t - max) over the whole vocabulary, from the
  // slices: the max over the ranks, then the sums of exp and the target's logit (only its
  // owner's is nonzero) in one all-reduce.
  ActivationPlan& a = acts_;
  const int64_t V = cfg_.vocab_size;
  a.logit_max.resize(static_cast<size_t>(N));
  a.logit_sums.resize(static_cast<size_t>(2 * N));
  kernels::cross_entropy_slice_max(a.logit_max.data(), a.logits, N, V);
  tp_->all_reduce_max(std::span<float>(a.logit_max), "tp logits max");
  float* sum_exp = a.logit_sums.data();
  float* target_logit = sum_exp + N;
  kernels::cross_entropy_slice_sums(sum_exp, target_logit, a.logits, a.logit_max.data(), targets, N, V, vocab_.begin,
                                    kIgnoreIndex);
  tp_->all_reduce_sum(std::span<float>(a.logit_sums), "tp logits sum of exp");
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) {
    const bool ignored = targets[n] == kIgnoreIndex;
    a.losses[n] = ignored ? 0.0f : std::log(sum_exp[n]) - target_logit[n];
    count += ignored ? 0 : 1;
  }
  return count;
}

void Llama::vocab_parallel_cross_entropy_backward(float dloss_scale) {
  ActivationPlan& a = acts_;
  const int64_t N = a.B * a.T;
  kernels::cross_entropy_slice_backward_inplace(a.logits, a.logit_max.data(), a.logit_sums.data(), a.targets.data(), N,
                                                cfg_.vocab_size, vocab_.begin, kIgnoreIndex, dloss_scale);
}

void Llama::lora_row_parallel_forward(int64_t l, LoraTarget t, float* y, const float* x, float* u, float* xd, int64_t N,
                                      std::optional<uint64_t> dropout_seed, const LoraAdapters& lora) const {
  const LoraSlot& s = lora.slot(l, t);
  if (!s.active()) return;
  if (dropout_seed) {
    lora_dropout(lora, l, t, xd, x, N, *dropout_seed, false);
    x = xd;
  }
  lora.project_down(l, t, u, x, N, adapter_input());  // this rank's columns' share of u
  tp_->all_reduce_sum({u, static_cast<size_t>(N * lora.config().rank)}, "tp LoRA u (row-parallel)");
  if (tp_->tp_rank() == 0) lora.project_up(l, t, y, u, N, adapter_input());
}

std::vector<ElementRange> Llama::tensor_parallel_split_ranges() const {
  std::vector<ElementRange> split;
  if (!tp_) return split;
  if (lora_) {
    // A column-parallel layer's B holds this rank's output rows (its A is whole); a
    // row-parallel one's (o, down) A its input columns (its B is whole).
    const int64_t r = lora_->config().rank;
    for (int64_t l = lora_->first_layer(); l < cfg_.n_layers; ++l)
      for (LoraTarget t : lora_->config().targets) {
        const LoraSlot& s = lora_->slot(l, t);
        if (!s.active()) continue;
        split.push_back(lora_row_parallel(t) ? ElementRange{s.a, s.a + r * s.in} : ElementRange{s.b, s.b + s.out * r});
      }
    // A mixture's experts' adapters alike: down's A by columns, gate's and up's B by rows.
    for (int64_t l = lora_->first_layer(); l < cfg_.n_layers; ++l) {
      if (!cfg_.moe_layer(l)) continue;
      for (int p = 0; p < kNumExpertProjs; ++p)
        for (int64_t e = 0; e < cfg_.moe.num_experts; ++e) {
          const LoraSlot& s = lora_->expert_slot(l, static_cast<ExpertProj>(p), e);
          if (!s.active()) continue;
          split.push_back(static_cast<ExpertProj>(p) == ExpertProj::down ? ElementRange{s.a, s.a + r * s.in}
                                                                          : ElementRange{s.b, s.b + s.out * r});
        }
    }
  } else {
    const ParamLayout full(tp_full_);
    for (const ParamInfo& info : full.params()) {
      const ParamInfo& mine = local_of(layout_, info);
      if (tensor_slice(info, mine) != TensorSlice::replicated) split.push_back({mine.offset, mine.offset + mine.numel});
    }
  }
  std::sort(split.begin(), split.end(), [](const ElementRange& x, const ElementRange& y) { return x.begin < y.begin; });
  std::vector<ElementRange> out;  // merged where adjacent
  for (const ElementRange& e : split) {
    if (!out.empty() && out.back().end == e.begin)
      out.back().end = e.end;
    else
      out.push_back(e);
  }
  return out;
}

double Llama::grad_sum_squares_tensor_parallel() {
  const Trainable t = trainable();
  if (!tp_) return kernels::sum_squares(t.grads.data(), static_cast<int64_t>(t.grads.size()));
  const std::vector<ElementRange> split = tensor_parallel_split_ranges();
  const SquareSums sums = square_sums(t.grads.data(), 0, static_cast<int64_t>(t.grads.size()), split);
  std::vector<double> total(1, sums.split);
  tp_->all_reduce_sum(std::span<double>(total), "tp gradient norm");
  return sums.replicated + total[0];
}

}  // namespace flotilla::model
