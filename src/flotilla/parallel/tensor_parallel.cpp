#include "flotilla/parallel/tensor_parallel.hpp"

#include <fmt/format.h>

#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/hash.hpp"
#include "flotilla/base/internal_error.hpp"
#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::parallel {

TensorParallel::TensorParallel(comm::Communicator& tp, comm::AllReduceAlgorithm algorithm)
    : tp_(tp), reducer_(tp, comm::AllReducer::Config{.algorithm = algorithm, .tuning = {}}) {}

void TensorParallel::count(uint64_t size_bytes, uint64_t sent, bool all_reduce) {
  if (!counting_) return;
  bytes_reduced_ += all_reduce ? size_bytes : size_bytes / 2;
  bytes_sent_ += sent;
  if (all_reduce) ++all_reduces_;
}

void TensorParallel::all_reduce_sum(std::span<float> values, const char* what) {
  reducer_.run(comm::MutView(values), comm::ReduceOp::sum, {.name = what});
  const auto bytes = static_cast<int64_t>(values.size_bytes());
  count(static_cast<uint64_t>(bytes), static_cast<uint64_t>(comm::ring_all_reduce_bytes(bytes, tp_.size())), true);
}

void TensorParallel::all_reduce_sum(std::span<double> values, const char* what) {
  // The gradient norm's one double: not an activation, not counted.
  tp_.all_reduce(comm::MutView(values), comm::ReduceOp::sum, {.name = what});
}

void TensorParallel::all_reduce_max(std::span<float> values, const char* what) {
  reducer_.run(comm::MutView(values), comm::ReduceOp::max, {.name = what});
  const auto bytes = static_cast<int64_t>(values.size_bytes());
  count(static_cast<uint64_t>(bytes), static_cast<uint64_t>(comm::ring_all_reduce_bytes(bytes, tp_.size())), true);
}

void TensorParallel::all_gather(std::span<const float> slice, std::span<float> whole, const char* what) {
  // The AllReducer's all-gather is in place on whole = (size, n): this rank's slice into
  // chunk `rank` first (a no-op where the caller built it there).
  const size_t n = slice.size();
  if (whole.size() != n * static_cast<size_t>(tp_.size()))
    throw InternalError("parallel/tensor", fmt::format("{}: all-gather of {} floats into {}, not {} x {}", what, n,
                                                       whole.size(), tp_.size(), n));
  float* mine = whole.data() + static_cast<size_t>(tp_.rank()) * n;
  if (n > 0 && mine != slice.data()) std::memmove(mine, slice.data(), slice.size_bytes());
  reducer_.all_gather(comm::MutView(whole), {.name = what});
  count(whole.size_bytes(),
        static_cast<uint64_t>(comm::ring_all_gather_bytes(static_cast<int64_t>(slice.size_bytes()), tp_.size())), false);
}

void TensorParallel::reduce_scatter_sum(std::span<const float> whole, std::span<float> slice, const char* what) {
  // The AllReducer's reduce-scatter is in place on (size, n) and leaves the other chunks
  // as scratch: it runs on a copy of `whole`, kept across calls.
  const size_t n = slice.size();
  if (whole.size() != n * static_cast<size_t>(tp_.size()))
    throw InternalError("parallel/tensor", fmt::format("{}: reduce-scatter of {} floats into {}, not {} x {}", what,
                                                       whole.size(), n, tp_.size(), n));
  if (scatter_scratch_.size() < whole.size()) scatter_scratch_.resize(whole.size());
  const std::span<float> work(scatter_scratch_.data(), whole.size());
  if (!whole.empty()) std::memcpy(work.data(), whole.data(), whole.size_bytes());
  reducer_.reduce_scatter(comm::MutView(work), comm::ReduceOp::sum, {.name = what});
  if (n > 0) std::memcpy(slice.data(), work.data() + static_cast<size_t>(tp_.rank()) * n, slice.size_bytes());
  count(whole.size_bytes(),
        static_cast<uint64_t>(comm::ring_reduce_scatter_bytes(static_cast<int64_t>(whole.size_bytes()), tp_.size())),
        false);
}

void TensorParallel::check_replicated_same(const model::Llama& local, const BeforeRead& before_read) {
  const model::ParamLayout full(local.full_config());
  uint64_t hash = kFnv1a64Offset;
  for (const model::ParamInfo& info : full.params()) {
    const model::ParamInfo* mine = local.layout().find(info.name);
    if (!mine || model::tensor_slice(info, *mine) != model::TensorSlice::replicated) continue;
    if (before_read) before_read(mine->offset);
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
                                                         "weights (the norms, a mixture's routers): their gradients "
                                                         "should be identical by construction",
                                                         r));
}

namespace {

// Rank 0 of `tp` assembles whole tensors: for every tensor of `full`, its own slice (or the
// replicated tensor) from `local_params`, then each other rank's slice, received in rank
// order into a scratch of one local tensor, into its place in `out`. The other ranks send
// their slices of the split tensors in the same order (replicated ones are rank 0's alone).
// `table_of(r)`: rank r's local table (their vocabulary slices may differ in size).
// `before_read` (may be empty) is told each local tensor's offset before it is read, on
// every rank.
template <class TableOf>
void gather_slices(comm::Communicator& tp, const model::ParamTable& full, const model::ParamTable& local,
                   std::span<const float> local_params, std::span<float> out, int tag, const char* what,
                   TableOf&& table_of, const TensorParallel::BeforeRead& before_read = {}) {
  std::vector<float> slice;
  const int size = tp.size();
  for (const model::ParamInfo& info : full.params()) {
    const model::ParamInfo& mine = *local.find(info.name);
    const bool split = model::tensor_slice(info, mine) != model::TensorSlice::replicated;
    if (before_read) before_read(mine.offset);
    if (tp.rank() != 0) {
      if (split)
        tp.send(comm::ConstView(local_params.subspan(static_cast<size_t>(mine.offset), static_cast<size_t>(mine.numel))),
                0, tag, {.name = what});
      continue;
    }
    model::copy_slice_in(info, mine, {0, size}, local_params, out);
    if (!split) continue;
    for (int r = 1; r < size; ++r) {
      model::ParamInfo received = *table_of(r).find(info.name);
      received.offset = 0;
      slice.resize(static_cast<size_t>(received.numel));
      tp.recv(comm::MutView(std::span<float>(slice)), r, tag, {.name = what});
      model::copy_slice_in(info, received, {r, size}, slice, out);
    }
  }
}

}  // namespace

std::optional<model::Llama> TensorParallel::gather_full_model(const model::Llama& local, const BeforeRead& before_read) {
  const model::ModelConfig& cfg = local.full_config();
  constexpr int kSliceTag = 7301;
  if (tp_.rank() != 0) {
    gather_slices(tp_, model::ParamLayout(cfg), local.layout(), local.params(), {}, kSliceTag, "tp slices",
                  [&](int) -> const model::ParamTable& { return local.layout(); }, before_read);
    return std::nullopt;
  }
  std::vector<model::ParamLayout> tables;  // each rank's local layout (their vocabulary slices)
  for (int r = 0; r < tp_.size(); ++r) tables.emplace_back(model::tensor_parallel_config(cfg, {r, tp_.size()}));
  model::Llama whole(cfg);
  gather_slices(tp_, whole.layout(), local.layout(), local.params(), whole.params(), kSliceTag, "tp slices",
                [&](int r) -> const model::ParamTable& { return tables[static_cast<size_t>(r)]; }, before_read);
  return whole;
}

std::optional<model::LoraAdapters> TensorParallel::gather_full_adapters(const model::LoraAdapters& local,
                                                                        const model::ModelConfig& full) {
  constexpr int kAdapterTag = 7302;
  if (tp_.rank() != 0) {
    const model::LoraAdapters shape(full, local.config());  // the whole adapters' table (small)
    gather_slices(tp_, shape.table(), local.table(), local.params(), {}, kAdapterTag, "tp LoRA slices",
                  [&](int) -> const model::ParamTable& { return local.table(); });
    return std::nullopt;
  }
  model::LoraAdapters whole(full, local.config());
  // The adapters' slices are alike in size on every rank (none is of the vocabulary).
  gather_slices(tp_, whole.table(), local.table(), local.params(), whole.params(), kAdapterTag, "tp LoRA slices",
                [&](int) -> const model::ParamTable& { return local.table(); });
  return whole;
}

}  // namespace flotilla::parallel
