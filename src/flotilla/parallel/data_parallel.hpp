// Data parallelism, the fully parallel setup: every rank holds the whole model, trains on
// its own slice of each global batch, and the gradients are combined across ranks before
// every optimizer step.
//
// Combining is weighted by tokens, not by ranks: each rank's gradient buffer holds the SUM
// of its per-token gradients, the all-reduce adds those sums, and the trainer divides by
// the global number of target tokens. That is exactly the gradient of the global batch's
// mean token loss even when ranks saw different numbers of target tokens (prompt masking,
// padding, packing) — which all_sum(g) / world_size of per-rank means is not.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/comm/algorithms/all_reduce.hpp"
#include "flotilla/comm/communicator.hpp"
#include "flotilla/comm/compression/gradient_codec.hpp"
#include "flotilla/comm/fusion.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::parallel {

class DataParallel {
 public:
  // Collective over comm (the all-reducer learns the hosts and splits its groups).
  // `algorithm` reduces the gradients (`flotilla train --allreduce`): automatic lets the
  // chooser pick by size and topology (comm/algorithms/all_reduce.hpp).
  explicit DataParallel(comm::Communicator& comm,
                        comm::AllReduceAlgorithm algorithm = comm::AllReduceAlgorithm::automatic);

  int rank() const { return comm_.rank(); }
  int world() const { return comm_.size(); }
  bool is_root() const { return comm_.rank() == 0; }
  comm::Communicator& communicator() { return comm_; }
  // The gradient all-reducer; also ZeRO's reduce-scatter and all-gather.
  comm::AllReducer& reducer() { return reducer_; }
  // The algorithm the gradients of `bytes` go through.
  comm::AllReduceAlgorithm gradient_algorithm(size_t bytes) const {
    return reducer_.algorithm_for(bytes);
  }

  // Every rank takes rank 0's values (initial trainable weights).
  void broadcast_parameters(std::span<float> params);
  // Gradients travel through this codec from now on (default: exact float32). `table`
  // describes the gradient buffer: its 2-D tensors are what PowerSGD factorises.
  void set_compression(const comm::CompressionConfig& config, const model::ParamTable& table);
  const comm::GradientCodec& codec() const { return *codec_; }
  // The codec's state, for a checkpoint of this rank (comm::GradientCodec::save_state).
  std::vector<comm::CodecState> codec_state() const { return codec_->save_state(); }
  void restore_codec_state(const std::vector<comm::CodecState>& state) { codec_->load_state(state); }

  // Sums gradient sums and (loss sum, target tokens) over ranks, in place; returns the
  // global LossSum. The gradients go through the codec (uncompressed: one all-reduce by
  // the configured algorithm), the counts in one small all-reduce (the backend's, in f64).
  model::LossSum all_reduce_gradients(std::span<float> grads, const model::LossSum& local);
  // The same for a part of the gradients, without the loss (a sync that reduces its parts
  // over different groups: parallel/expert_sync.hpp); counted as gradient bytes.
  void all_reduce_gradient_part(std::span<float> grads) { codec_->all_reduce_sum(grads, comm_); }
  // Overlap (exact gradients only): fusion buckets of about `bucket_bytes` over the ranges
  // of `ready_order` (the order backward finishes them), each reduced by the gradient
  // all-reducer on a communication thread while backward goes on.
  void enable_overlap(std::span<const comm::GradRange> ready_order, int64_t bucket_bytes, TraceRecorder* trace);
  comm::OverlappedAllReduce* overlap() { return overlap_.get(); }
  // The end of an overlapped exchange: waits for every bucket, then sums
  // (loss sum, target tokens) as all_reduce_gradients does.
  model::LossSum finish_overlapped_gradients(const model::LossSum& local);
  // What this rank sent for gradients so far (ring convention), by either path, and how
  // many exchanges that was.
  int64_t gradient_bytes_sent() const { return codec_->bytes_sent() + overlapped_bytes_; }
  int64_t gradient_exchanges() const { return codec_->calls() + overlapped_exchanges_; }

  // Sums a loss over ranks (validation).
  model::LossSum all_reduce_loss(const model::LossSum& local);
  // The largest of the ranks' values, on every rank: for decisions every rank must take at
  // the same step (stop on a signal one rank received, skip a step one rank found
  // non-finite). One all-reduce of 8 bytes.
  int64_t max_over_ranks(int64_t value, std::string_view what);
  // Every rank must pass the same `digest` for `what` (model, data, binary): otherwise an
  // InputError naming the ranks that differ and their values.
  void check_same(std::string_view what, const std::string& digest);
  // A few bytes of text between the phases of a collective task (a checkpoint's folder
  // name, its files' checksums, an outcome): rank 0's `text` on every rank; and every
  // rank's `text`, in rank order, on every rank. Two small collectives each.
  std::string broadcast_text(const std::string& text, std::string_view what);
  std::vector<std::string> all_gather_text(const std::string& text, std::string_view what);

 private:
  comm::Communicator& comm_;
  comm::AllReducer reducer_;
  std::unique_ptr<comm::GradientCodec> codec_;
  std::unique_ptr<comm::OverlappedAllReduce> overlap_;
  int64_t overlapped_bytes_ = 0, overlapped_exchanges_ = 0;
};

}  // namespace flotilla::parallel
