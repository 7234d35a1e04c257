#include "flotilla/parallel/data_parallel.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::parallel {

DataParallel::DataParallel(comm::Communicator& comm, comm::AllReduceAlgorithm algorithm)
    : comm_(comm),
      reducer_(comm, comm::AllReducer::Config{.algorithm = algorithm, .tuning = {}}),
      codec_(comm::make_gradient_codec({}, 0, {})) {
  codec_->set_exact_reducer(&reducer_);
}

void DataParallel::set_compression(const comm::CompressionConfig& config, const model::ParamTable& table) {
  // Matrices as (rows, cols); anything else as one row of all its elements.
  std::vector<comm::MatrixShape> tensors;
  for (const model::ParamInfo& p : table.params())
    tensors.push_back({p.offset, p.shape.size() == 2 ? p.shape[0] : 1, p.shape.size() == 2 ? p.shape[1] : p.numel});
  codec_ = comm::make_gradient_codec(config, table.total_numel(), std::move(tensors));
  codec_->set_exact_reducer(&reducer_);
}

void DataParallel::broadcast_parameters(std::span<float> params) {
  comm_.broadcast(params, 0, comm::Options{.name = "parameters"});
}

model::LossSum DataParallel::all_reduce_gradients(std::span<float> grads, const model::LossSum& local) {
  codec_->all_reduce_sum(grads, comm_);
  return all_reduce_loss(local);
}

void DataParallel::enable_overlap(std::span<const comm::GradRange> ready_order, int64_t bucket_bytes,
                                  TraceRecorder* trace) {
  if (codec_->kind() != comm::Compression::none)
    throw Error("parallel", "overlap needs exact gradients: a compressing codec works on the whole gradient");
  overlap_ = std::make_unique<comm::OverlappedAllReduce>(
      comm::plan_buckets(ready_order, bucket_bytes),
      [this](std::span<float> bucket) {
        reducer_.run(bucket, comm::ReduceOp::sum, comm::Options{.name = "gradient bucket"});
      },
      trace);
}

model::LossSum DataParallel::finish_overlapped_gradients(const model::LossSum& local) {
  overlap_->finish();
  // Every bucket is one ring all-reduce of its bytes.
  for (const comm::GradRange& b : overlap_->buckets())
    overlapped_bytes_ += comm::ring_all_reduce_bytes(b.size() * static_cast<int64_t>(sizeof(float)), world());
  ++overlapped_exchanges_;
  return all_reduce_loss(local);
}

model::LossSum DataParallel::all_reduce_loss(const model::LossSum& local) {
  // Token counts travel as doubles next to the loss sum: exact below 2^53 tokens.
  std::array<double, 2> sums = {local.sum, static_cast<double>(local.num_tokens)};
  comm_.all_reduce(sums, comm::ReduceOp::sum, comm::Options{.name = "loss"});
  return model::LossSum{sums[0], static_cast<int64_t>(sums[1])};
}

int64_t DataParallel::max_over_ranks(int64_t value, std::string_view what) {
  std::array<double, 1> v = {static_cast<double>(value)};  // exact below 2^53
  comm_.all_reduce(v, comm::ReduceOp::max, comm::Options{.name = what});
  return static_cast<int64_t>(v[0]);
}

void DataParallel::check_same(std::string_view what, const std::string& digest) {
  constexpr size_t kBytes = 64;
  std::array<uint8_t, kBytes> mine{};
  std::memcpy(mine.data(), digest.data(), std::min(digest.size(), kBytes));
  std::vector<uint8_t> all(kBytes * static_cast<size_t>(world()));
  comm_.all_gather(mine, all, comm::Options{.name = "check_same"});
  std::string differ;
  for (int r = 1; r < world(); ++r) {
    if (std::memcmp(all.data(), all.data() + r * kBytes, kBytes) != 0) {
      const std::string theirs(reinterpret_cast<const char*>(all.data() + r * kBytes),
                               strnlen(reinterpret_cast<const char*>(all.data() + r * kBytes), kBytes));
      differ += fmt::format("{}rank {} has {}", differ.empty() ? "" : "; ", r, theirs);
    }
  }
  if (!differ.empty()) {
    const std::string root(reinterpret_cast<const char*>(all.data()), strnlen(reinterpret_cast<const char*>(all.data()), kBytes));
    throw InputError("parallel", fmt::format("ranks see different {}: rank 0 has {}; {}", what, root, differ));
  }
}

std::string DataParallel::broadcast_text(const std::string& text, std::string_view what) {
  std::array<int64_t, 1> size = {static_cast<int64_t>(text.size())};
  comm_.broadcast(size, 0, comm::Options{.name = std::string(what) + " (size)"});
  // One byte more than the text: never a collective of nothing.
  std::vector<uint8_t> bytes(static_cast<size_t>(size[0]) + 1);
  if (is_root()) std::memcpy(bytes.data(), text.data(), text.size());
  comm_.broadcast(bytes, 0, comm::Options{.name = std::string(what)});
  return std::string(bytes.begin(), bytes.end() - 1);
}

std::vector<std::string> DataParallel::all_gather_text(const std::string& text, std::string_view what) {
  const std::array<int64_t, 1> mine = {static_cast<int64_t>(text.size())};
  std::vector<int64_t> sizes(static_cast<size_t>(world()));
  comm_.all_gather(mine, sizes, comm::Options{.name = std::string(what) + " (sizes)"});
  const int64_t longest = std::max<int64_t>(1, *std::max_element(sizes.begin(), sizes.end()));
  std::vector<uint8_t> padded(static_cast<size_t>(longest)), all(static_cast<size_t>(longest * world()));
  std::memcpy(padded.data(), text.data(), text.size());
  comm_.all_gather(padded, all, comm::Options{.name = std::string(what)});
  std::vector<std::string> texts;
  for (int r = 0; r < world(); ++r) {
    const auto* at = reinterpret_cast<const char*>(all.data() + r * longest);
    texts.emplace_back(at, static_cast<size_t>(sizes[static_cast<size_t>(r)]));
  }
  return texts;
}

}  // namespace flotilla::parallel
