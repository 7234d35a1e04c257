#include "flotilla/parallel/zero.hpp"

#include <fmt/format.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/comm/compression/wire_sum.hpp"
#include "flotilla/comm/fusion.hpp"
#include "flotilla/comm/wire_bytes.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/parallel/chunk_cut.hpp"
#include "flotilla/parallel/shard_norm.hpp"

namespace flotilla::parallel {
namespace {

constexpr int64_t kFloat = sizeof(float);
constexpr size_t kStage2InFlight = 2;

// One unit of the arena, cut over the ranks (parallel/chunk_cut.hpp).
struct Unit : ChunkCut {
  int64_t chunk_slot = 0, tail_slot = 0;  // where this rank's chunk and the tail sit in the shard buffer
};

class ZeroSync final : public GradientSync, private model::ParallelContext {
 public:
  // `given`: the ranges to shard (each one unit, no overlap); empty: the whole arena.
  ZeroSync(model::Llama& model, DataParallel& dp, int stage, double bucket_mb, TraceRecorder* trace,
           std::span<const ArenaRange> given = {})
      : GradientSync(model), dp_(dp), stage_(stage), world_(dp.world()), rank_(dp.rank()) {
    // The arenas, taken once here on the calling thread: reduce_unit runs on the
    // communication thread while the main thread may use the model, and must not call
    // Llama::trainable() (which marks the model's bf16 copy stale and may allocate).
    const model::Llama::Trainable trainable = model_.trainable();
    params_ = trainable.params;
    grads_ = trainable.grads;
    const auto arena = static_cast<int64_t>(params_.size());
    std::vector<comm::GradRange> ranges;
    if (!given.empty()) {
      for (const ArenaRange& r : given) ranges.push_back({r.begin, r.end});
    } else if (world_ > 1 && bucket_mb > 0.0) {
      // Units are the fusion buckets, reduced on the communication thread as backward
      // finishes them: the hook must be set before the model can list its ranges.
      model_.set_parallel_context(this);
      std::vector<comm::GradRange> order;
      for (const model::GradSpan& s : model_.grad_ready_order()) order.push_back({s.begin, s.end});
      ranges = comm::plan_buckets(order, static_cast<int64_t>(bucket_mb * 1024 * 1024));
      overlap_ = std::make_unique<comm::OverlappedAllReduce>(
          ranges, [this](std::span<float> bucket) { reduce_unit(bucket); }, trace);
    } else {
      ranges.push_back({0, arena});
    }
    // Shard slots in ascending arena order: what this rank owns, as AdamW wants it.
    std::vector<comm::GradRange> ascending = ranges;
    std::sort(ascending.begin(), ascending.end(), [](auto& a, auto& b) { return a.begin < b.begin; });
    int64_t slot = 0;
    for (const comm::GradRange& r : ascending) {
      Unit u{ChunkCut(r.begin, r.end, world_), 0, 0};
      u.chunk_slot = slot;
      slot += u.chunk;
      u.tail_slot = slot;
      slot += u.tail_size();
      u.append_owned(owned_, rank_);
      units_.push_back(u);
    }
    // owned_ must be ascending: a rank's chunk of a unit lies below that unit's tail, and
    // units do not overlap.
    shard_grads_.resize(static_cast<size_t>(slot));
    tp_split_ = model_.tensor_parallel_split_ranges();
    if (stage_ >= 2) {
      // Stage 2 hands each unit's part of the gradient arena back once it is reduced, and
      // the next backward faults it in again: with 4 KiB pages that was 17 k faults a step
      // on W1 (98 MB of gradient), 7-13% more CPU than plain data parallelism. A huge page (2
      // MiB) takes one fault where 4 KiB pages took 512; the pages given back and the peak
      // stay the same (bench/RESULTS.md, "ZeRO-2's page faults"). Advice only: where the
      // kernel declines (no transparent huge pages, a heap buffer under 1 MiB), it runs as
      // before.
      (void)::madvise(grads_.data(), grads_.size_bytes(), MADV_HUGEPAGE);
    }
    const comm::Compression kind = dp.codec().kind();
    if (kind == comm::Compression::fp16 || kind == comm::Compression::bf16) {
      narrow_.emplace(kind == comm::Compression::fp16 ? comm::WireDtype::fp16 : comm::WireDtype::bf16);
      int64_t largest = 0;
      for (const Unit& u : units_) largest = std::max(largest, u.chunk);
      narrow_chunk_.resize(static_cast<size_t>(largest));
    }
  }

  ~ZeroSync() override {
    if (overlap_) model_.set_parallel_context(nullptr);
  }

  std::string name() const override {
    return narrow_ ? fmt::format("ZeRO-{}, gradient shards in {}", stage_, comm::compression_name(dp_.codec().kind()))
                   : fmt::format("ZeRO-{}", stage_);
  }
  std::string signature() const override { return fmt::format("{}, {} units", name(), units_.size()); }
  bool overlapped() const override { return overlap_ != nullptr; }
  bool sharded() const override { return world_ > 1; }

  void zero_grads() override {
    // Stage 2 released the arena bucket by bucket: it reads as zero already.
    if (!released_) model_.zero_grads();
    released_ = false;
    reduced_ = 0;
  }

  // Stage 1 reduces once, after the last micro-batch (the arena accumulates the others, as in
  // plain data parallelism). Stage 2 reduces after every micro-batch into the shard and
  // releases the arena, so the whole gradient never waits for the next micro-batch.
  void before_backward(int64_t micro, int64_t micro_batches) override {
    last_micro_ = micro == micro_batches - 1;
    if (!reduces_now()) return;
    // Fixed before any bucket of this micro-batch is reduced (on the communication thread).
    accumulate_ = reduced_ > 0;
    ++reduced_;
    if (overlap_) {
      active_ = true;
      overlap_->begin(grads_);
    }
  }

  void after_backward() override {
    if (reduces_now()) {
      if (overlap_) {
        active_ = false;
        if (!last_micro_) overlap_->finish();  // the next backward writes the released arena
      } else if (!last_micro_) {
        reduce_all();
      }
    }
  }

  Exchanged exchange(const model::LossSum& local) override {
    if (overlap_) overlap_->finish();
    else reduce_all();
    ++exchanges_;
    released_ = stage_ >= 2;
    const model::LossSum global = dp_.all_reduce_loss(local);
    return {global, global.num_tokens};
  }

  std::vector<ArenaRange> owned() const override { return owned_; }
  std::vector<ArenaRange> sole_owned() const override {
    std::vector<ArenaRange> sole;
    for (const Unit& u : units_) u.append_sole_owned(sole, rank_);
    return sole;
  }
  std::span<float> owned_grads() override { return shard_grads_.span(); }

  // Under tensor parallelism the arena is this tp rank's local model: shard_norm.hpp sums
  // the split tensors' squares over tp too.
  double grad_sum_squares() override {
    return sharded_grad_sum_squares(units_, rank_, shard_grads_.data(), tp_split_, dp_.communicator(),
                                    model_.tensor_parallel());
  }

  // Every rank updated its chunks in place; each takes the others'.
  void after_update(int64_t, bool) override {
    // The weights change under the model: its bf16 copy, if any, must be made again.
    const std::span<float> params = model_.trainable().params;
    for (const Unit& u : units_) {
      if (u.chunk == 0) continue;
      dp_.reducer().all_gather(params.subspan(static_cast<size_t>(u.begin), static_cast<size_t>(u.chunk * world_)),
                               comm::Options{.name = "weight shards"});
      bytes_ += comm::ring_all_gather_bytes(u.chunk * kFloat, world_);
    }
  }

  void take_owned(std::span<const float> whole, std::span<float> owned) const override {
    check_sizes(owned, whole);
    for (const Unit& u : units_) {
      std::copy_n(whole.begin() + u.chunk_of(rank_).begin, u.chunk, owned.begin() + u.chunk_slot);
      std::copy_n(whole.begin() + u.tail().begin, u.tail_size(), owned.begin() + u.tail_slot);
    }
  }

  int64_t bytes_sent() const override { return bytes_; }
  int64_t exchanges() const override { return exchanges_; }

 private:
  // Backward finished this range: its bucket is reduced now (on the last micro-batch).
  void grad_ready(model::GradSpan s) override {
    if (!active_) return;
    overlap_->ready({s.begin, s.end});
    // Stage 2 holds only the buckets in flight: when backward outruns the network it
    // waits here rather than fill the arena (at most two buckets queued, one of them
    // being reduced, besides the one backward writes).
    if (stage_ >= 2) overlap_->wait_in_flight(kStage2InFlight);
  }

  bool reduces_now() const { return stage_ >= 2 || last_micro_; }

  void reduce_all() {
    for (const Unit& u : units_)
      reduce_unit(grads_.subspan(static_cast<size_t>(u.begin), static_cast<size_t>(u.end - u.begin)));
  }

  // A unit's gradient from every rank: reduce-scattered into this rank's chunk slot, the tail
  // all-reduced into the tail slot (added to what earlier micro-batches left there, stage
  // 2); stage 2 then releases the unit's part of the arena. On the communication thread
  // when overlapping.
  void reduce_unit(std::span<float> part) {
    const int64_t begin = part.data() - grads_.data();
    // units_ is ascending in the arena: the first one not starting below `begin`.
    const auto it = std::partition_point(units_.begin(), units_.end(), [&](const Unit& u) { return u.begin < begin; });
    if (it == units_.end() || it->begin != begin || it->end - it->begin != static_cast<int64_t>(part.size()))
      throw Error("parallel/zero", fmt::format("no unit starts at {} with {} floats", begin, part.size()));
    const Unit& u = *it;
    comm::Communicator& comm = dp_.communicator();
    const bool accumulate = accumulate_;
    if (u.chunk > 0) {
      // In place: the unit's gradient is spent afterwards (stage 2 releases it, stage 1
      // zeroes it before the next step), so its other chunks may hold partial sums.
      const std::span<float> chunks = part.first(static_cast<size_t>(u.chunk * world_));
      const float* mine = chunks.data() + rank_ * u.chunk;
      if (narrow_) {
        const std::span<float> sum = std::span<float>(narrow_chunk_.data(), static_cast<size_t>(u.chunk));
        bytes_ += narrow_->reduce_scatter(chunks, comm, sum, {}, "gradient shards (narrow)");
        mine = sum.data();
      } else {
        dp_.reducer().reduce_scatter(chunks, comm::ReduceOp::sum, comm::Options{.name = "gradient shards"});
        bytes_ += comm::ring_reduce_scatter_bytes(u.chunk * world_ * kFloat, world_);
      }
      float* slot = shard_grads_.data() + u.chunk_slot;
      if (accumulate) kernels::add_inplace(slot, mine, u.chunk);
      else std::copy_n(mine, u.chunk, slot);
    }
    const int64_t tail = u.tail_size();
    if (tail > 0) {
      const std::span<float> t = part.subspan(static_cast<size_t>(u.chunk * world_));
      comm.all_reduce(t, comm::ReduceOp::sum, comm::Options{.name = "gradient tail"});
      float* slot = shard_grads_.data() + u.tail_slot;
      if (accumulate) kernels::add_inplace(slot, t.data(), tail);
      else std::copy(t.begin(), t.end(), slot);
      bytes_ += comm::ring_all_reduce_bytes(tail * kFloat, world_);
    }
    if (stage_ >= 2) release_zeroed(part.data(), part.size_bytes());
  }

  void check_sizes(std::span<const float> owned, std::span<const float> whole) const {
    if (owned.size() != shard_grads_.size() || whole.size() != params_.size())
      throw Error("parallel/zero", fmt::format("a shard of {} floats and a whole of {} were given; this rank owns {} "
                                               "of {}",
                                               owned.size(), whole.size(), shard_grads_.size(), params_.size()));
  }

  DataParallel& dp_;
  std::span<float> params_, grads_;  // the model's arenas (P,): weights and gradients
  const int stage_;
  const int64_t world_;  // N
  const int64_t rank_;
  std::vector<Unit> units_;         // ascending in the arena
  std::vector<ArenaRange> owned_;   // this rank's chunks and every tail, ascending
  std::vector<ArenaRange> tp_split_;  // tensor parallel: the arena's slices of split tensors
  Buffer<float> shard_grads_;       // the owned ranges' summed gradients
  std::unique_ptr<comm::OverlappedAllReduce> overlap_;
  std::optional<comm::detail::WireSum> narrow_;  // --compression fp16|bf16: chunks reduced in halves
  std::vector<float> narrow_chunk_;               // one unit's summed chunk, from the halves
  bool active_ = false;             // backward reports finished ranges to the buckets
  bool last_micro_ = true;
  int64_t reduced_ = 0;             // micro-batches reduced into the shard this step
  bool accumulate_ = false;         // the current one adds to the shard (stage 2, not the first)
  bool released_ = false;
  int64_t bytes_ = 0, exchanges_ = 0;
};

}  // namespace

std::unique_ptr<GradientSync> make_zero_sync(model::Llama& model, DataParallel& dp, int stage, double bucket_mb,
                                             TraceRecorder* trace) {
  if (stage < 1 || stage > 2) throw InputError("parallel", fmt::format("--zero {}: stages 1 and 2 are built", stage));
  return std::make_unique<ZeroSync>(model, dp, stage, bucket_mb, trace);
}

std::unique_ptr<GradientSync> make_zero_sync_over(model::Llama& model, DataParallel& dp,
                                                  std::span<const ArenaRange> ranges) {
  if (ranges.empty()) throw Error("parallel/zero", "make_zero_sync_over: no ranges to shard");
  return std::make_unique<ZeroSync>(model, dp, 1, 0.0, nullptr, ranges);
}

}  // namespace flotilla::parallel
