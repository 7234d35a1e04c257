#include "flotilla/parallel/tensor_parallel.hpp"

#include <fmt/format.h>

#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/hash.hpp"
#include "flotilla/base/internal_error.hpp"

namespace flotilla::parallel {

void TensorParallel::all_reduce_sum(std::span<float> values, const char* what) {
  tp_.all_reduce(comm::MutView(values), comm::ReduceOp::sum, {.name = what});
  bytes_reduced_ += values.size_bytes();
  ++all_reduces_;
}

void TensorParallel::all_reduce_sum(std::span<double> values, const char* what) {
  tp_.all_reduce(comm::MutView(values), comm::ReduceOp::sum, {.name = what});
}

void TensorParallel::check_replicated_same(const model::Llama& local) {
  const model::ParamLayout full(local.full_config());
  uint64_t hash = kFnv1a64Offset;
  for (const model::ParamInfo& info : full.params()) {
    const model::ParamInfo* mine = local.layout().find(info.name);
    if (!mine || model::tensor_slice(info, *mine) != model::TensorSlice::replicated) continue;
    const std::span<const float> w = local.params().subspan(static_cast<size_t>(mine->offset),
                                                            static_cast<size_t>(mine->numel));
    hash = fnv1a64(std::string_view(reinterpret_cast<const char*>(w.data()), w.size_bytes()), hash);
  }
  std::vector<int64_t> all(static_cast<size_t>(tp_.size()));
  const auto mine = static_cast<int64_t>(hash);
  tp_.all_gather(comm::ConstView(std::span<const int64_t>(&mine, 1)), comm::MutView(std::span<int64_t>(all)),
                 {.name = "tp replicated weights"});
  for (size_t r = 1; r < all.size(); ++r)
    if (all[r] != all[0])
      throw InternalError("parallel/tensor", fmt::format("tensor-parallel ranks 0 and {} hold different replicated "
                                                         "weights (norms, embedding, lm_head): their gradients "
                                                         "should be identical by construction",
                                                         r));
}

std::optional<model::Llama> TensorParallel::gather_full_model(const model::Llama& local) {
  const model::ModelConfig& cfg = local.full_config();
  const model::ParamLayout full_layout(cfg);
  constexpr int kSliceTag = 7301;
  if (tp_.rank() != 0) {
    for (const model::ParamInfo& info : full_layout.params()) {
      const model::ParamInfo* mine = local.layout().find(info.name);
      if (model::tensor_slice(info, *mine) == model::TensorSlice::replicated) continue;
      tp_.send(comm::ConstView(local.params().subspan(static_cast<size_t>(mine->offset),
                                                      static_cast<size_t>(mine->numel))),
               0, kSliceTag, {.name = "tp slices"});
    }
    return std::nullopt;
  }
  model::Llama whole(cfg);
  const std::span<float> out = whole.params();
  std::vector<float> slice;
  for (const model::ParamInfo& info : full_layout.params()) {
    const model::ParamInfo& mine = *local.layout().find(info.name);
    // Rank 0's own slice (or the replicated tensor) from its model, the others' received
    // into a scratch holding one local tensor.
    model::copy_slice_in(info, mine, 0, local.params(), out);
    if (model::tensor_slice(info, mine) == model::TensorSlice::replicated) continue;
    model::ParamInfo received = mine;
    received.offset = 0;
    slice.resize(static_cast<size_t>(mine.numel));
    for (int r = 1; r < tp_.size(); ++r) {
      tp_.recv(comm::MutView(std::span<float>(slice)), r, kSliceTag, {.name = "tp slices"});
      model::copy_slice_in(info, received, r, slice, out);
    }
  }
  return whole;
}

std::optional<model::LoraAdapters> TensorParallel::gather_full_adapters(const model::LoraAdapters& local,
                                                                        const model::ModelConfig& full) {
  constexpr int kAdapterTag = 7302;
  if (tp_.rank() != 0) {
    for (const model::ParamInfo& info : local.table().params()) {
      if (!info.name.ends_with(".lora_B.weight")) continue;
      tp_.send(comm::ConstView(local.params().subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel))),
               0, kAdapterTag, {.name = "tp LoRA slices"});
    }
    return std::nullopt;
  }
  model::LoraAdapters whole(full, local.config());
  const std::span<float> out = whole.params();
  std::vector<float> slice;
  for (const model::ParamInfo& info : whole.table().params()) {
    const model::ParamInfo& mine = *local.table().find(info.name);
    model::copy_slice_in(info, mine, 0, local.params(), out);
    if (model::tensor_slice(info, mine) == model::TensorSlice::replicated) continue;
    model::ParamInfo received = mine;
    received.offset = 0;
    slice.resize(static_cast<size_t>(mine.numel));
    for (int r = 1; r < tp_.size(); ++r) {
      tp_.recv(comm::MutView(std::span<float>(slice)), r, kAdapterTag, {.name = "tp LoRA slices"});
      model::copy_slice_in(info, received, r, slice, out);
    }
  }
  return whole;
}

}  // namespace flotilla::parallel
