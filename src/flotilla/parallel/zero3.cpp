// ZeRO stage 3 (parallel/zero3.hpp): the weights sharded too, gathered group by group.
#include "flotilla/parallel/zero3.hpp"

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/comm/wire_bytes.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/parallel/chunk_cut.hpp"
#include "flotilla/parallel/shard_norm.hpp"

namespace flotilla::parallel {
namespace {

constexpr std::string_view kZero3Component = "parallel/zero3";
constexpr int64_t kParamBytes = sizeof(float);
// Reduce-scatters queued behind backward before it waits (as ZeRO-2's buckets in flight).
constexpr size_t kReducesInFlight = 2;

// One communication thread running tasks in the order they were queued. The gathers and
// the reduce-scatters share it, so every rank issues its collectives in one order: the
// order the model's hooks came in, the same on every rank running the same schedule.
class CommQueue {
 public:
  explicit CommQueue(TraceRecorder* trace) : trace_(trace), thread_([this] { serve(); }) {}
  ~CommQueue() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    work_.notify_all();
    thread_.join();
  }
  CommQueue(const CommQueue&) = delete;
  CommQueue& operator=(const CommQueue&) = delete;

  // Queues `task`; returns its ticket (1, 2, ...).
  uint64_t push(std::string name, std::function<void()> task) {
    uint64_t ticket = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ticket = ++pushed_;
      queue_.push_back({std::move(name), std::move(task)});
    }
    work_.notify_all();
    return ticket;
  }
  // Until task `ticket` has run; rethrows the thread's first error. Each collective is
  // bounded by its deadline (comm::Settings::timeout), so the wait is too.
  void wait(uint64_t ticket) {
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return done_ >= ticket || error_; });
    if (error_) std::rethrow_exception(error_);
  }
  void drain() { wait(pushed_); }

 private:
  struct Task {
    std::string name;
    std::function<void()> run;
  };
  void serve() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping
        task = std::move(queue_.front());
        queue_.pop_front();
        if (error_ || stop_) {
          // After a failure the communicator is unusable: the rest is dropped.
          ++done_;
          done_cv_.notify_all();
          continue;
        }
      }
      try {
        TraceSpan span(trace_, task.name, TraceLane::communication);
        task.run();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ++done_;
      }
      done_cv_.notify_all();
    }
  }

  TraceRecorder* trace_;
  std::mutex mutex_;
  std::condition_variable work_, done_cv_;
  std::deque<Task> queue_;
  uint64_t pushed_ = 0, done_ = 0;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after everything it uses exists
};

// The groups in arena order: the embedding, each block, the head (final norm, lm_head).
struct GroupBounds {
  std::string name;  // "embedding", "block 3", "head"
  int64_t begin = 0, end = 0;
};
std::vector<GroupBounds> group_bounds(const model::ModelConfig& cfg, const model::ParamLayout& layout,
                                      int64_t arena) {
  std::vector<GroupBounds> groups;
  groups.push_back({"embedding", 0, layout.layers[0].ln1.offset()});
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const int64_t end = l + 1 < cfg.n_layers ? layout.layers[static_cast<size_t>(l + 1)].ln1.offset()
                                             : layout.final_norm.offset();
    groups.push_back({fmt::format("block {}", l), layout.layers[static_cast<size_t>(l)].ln1.offset(), end});
  }
  groups.push_back({"head", layout.final_norm.offset(), arena});
  return groups;
}

// One group of the arena (the embedding, a decoder block, the head), cut over the ranks
// as stages 1-2 cut a unit (parallel/chunk_cut.hpp).
struct Group : ChunkCut {
  std::string name;  // "embedding", "block 3", "head"
  int64_t chunk_slot = 0, tail_slot = 0;  // where this rank's chunk and the tail sit in the shard buffer
  int64_t grad_floats = 0;                // the gradient ranges grad_ready reports for it, in floats
  int64_t grad_pending = 0;               // of those, not yet reported this backward
  // A 4-bit base: the group's quantized matrices in the packed arena (Llama::packed_places),
  // cut as the floats are; empty without.
  ChunkCut packed;
  enum class State : uint8_t { whole, gathering, released } state = State::whole;
  uint64_t ticket = 0;  // the gather in flight (gathering)
};

// Which group a quantized matrix belongs to, by its name: a decoder block's, the head's
// (an untied lm_head) or the embedding's.
size_t packed_group_of(const std::string& name, size_t groups) {
  constexpr std::string_view kBlock = "model.layers.";
  if (name.starts_with(kBlock)) return static_cast<size_t>(std::stoll(name.substr(kBlock.size()))) + 1;
  if (name.starts_with("lm_head")) return groups - 1;
  return 0;
}

class Zero3Sync final : public GradientSync, private model::ParallelContext {
 public:
  Zero3Sync(model::Llama& model, DataParallel& dp, const Zero3Options& options, TraceRecorder* trace)
      : GradientSync(model), dp_(dp), world_(dp.world()), rank_(dp.rank()), poison_(options.poison_released),
        frozen_(model.base_frozen()), bf16_(model.matmul_input() == kernels::GemmInput::bf16), trace_(trace),
        queue_(trace) {
    const model::ModelConfig& cfg = model_.config();
    const model::ParamLayout& layout = model_.layout();
    // The arenas, taken here on the calling thread: the communication thread must not call
    // Llama::trainable(), which marks the model's bf16 copy stale and may allocate. With
    // LoRA the groups are the frozen base's (params()), the gradients the adapters'.
    const model::Llama::Trainable trainable = model_.trainable();
    params_ = frozen_ ? model_.params() : trainable.params;
    grads_ = trainable.grads;
    const auto arena = static_cast<int64_t>(params_.size());
    tied_ = cfg.tie_embeddings;
    if (frozen_) lowest_trained_ = model_.lora()->first_layer();
    for (const GroupBounds& b : group_bounds(cfg, layout, arena)) {
      Group g;
      static_cast<ChunkCut&>(g) = ChunkCut(b.begin, b.end, world_);
      g.name = b.name;
      groups_.push_back(g);
    }
    model_.set_parallel_context(this);
    page_floats_ = std::max<int64_t>(1, ::sysconf(_SC_PAGESIZE) / kParamBytes);
    if (model_.quantized()) cut_packed_base();
    // Every gather faults the other ranks' chunks of its group back in, and every backward
    // the gradient arena (both are handed back after use): with 4 KiB pages that was about
    // 36 k faults a step more than plain data parallelism on W1 (2.5x its faults, 1.2-1.3x
    // its CPU time); advised, 1.2x and 1.02-1.09x (bench/RESULTS.md). A huge page (2 MiB)
    // takes one fault where 4 KiB pages took 512, as ZeRO-2's gradient arena does
    // (parallel/zero.cpp). What is handed back stays the same: a huge page partly released
    // is split and its released part freed. Advice only: where the kernel declines, it
    // runs as before.
    if (world_ > 1) {
      (void)::madvise(params_.data(), params_.size_bytes(), MADV_HUGEPAGE);
      if (!frozen_) (void)::madvise(grads_.data(), grads_.size_bytes(), MADV_HUGEPAGE);
      if (!packed_.empty()) (void)::madvise(packed_.data(), packed_.size_bytes(), MADV_HUGEPAGE);
    }
    if (frozen_) {
      // Nothing of the base is reduced: the adapters are all-reduced whole at the exchange.
      for (size_t j = 0; j < groups_.size(); ++j) release(j);
      return;
    }
    // Every range backward reports must lie in one group and the group's ranges tile it:
    // then a group's gradient is complete exactly when its last range is reported.
    for (const model::GradSpan& s : model_.grad_ready_order()) {
      Group& g = group_at(s.begin);
      if (s.end > g.end)
        throw Error("parallel/zero3", fmt::format("the gradient range [{}, {}) crosses the end of group {} at {}",
                                                  s.begin, s.end, g.name, g.end));
      g.grad_floats += s.end - s.begin;
    }
    int64_t slot = 0;
    for (Group& g : groups_) {
      if (g.grad_floats != g.end - g.begin)
        throw Error("parallel/zero3", fmt::format("backward reports {} of group {}'s {} floats", g.grad_floats, g.name,
                                                  g.end - g.begin));
      g.chunk_slot = slot;
      slot += g.chunk;
      g.tail_slot = slot;
      slot += g.tail_size();
      g.append_owned(owned_, rank_);
    }
    shard_grads_.resize(static_cast<size_t>(slot));
    tp_split_ = model_.tensor_parallel_split_ranges();
    // Only the shard is known to be current: the model may have been built on this rank's
    // ranges alone (train/job_model.cpp), the rest of the arena never written. Every group
    // starts released, and the first forward gathers each one; the pages of other ranks'
    // chunks a whole model holds (one loaded whole, or broadcast) go back to the system now.
    for (size_t j = 0; j < groups_.size(); ++j) release(j);
  }

  ~Zero3Sync() override {
    model_.set_parallel_context(nullptr);
    // The queue's thread finishes its task (bounded by the collective's deadline) and
    // drops the rest: destroyed with this object.
  }

  std::string name() const override { return frozen_ ? "ZeRO-3, frozen base, adapters all-reduced" : "ZeRO-3"; }
  std::string signature() const override { return fmt::format("{}, {} groups", name(), groups_.size()); }
  bool overlapped() const override { return !frozen_; }
  // With LoRA what is trained (the adapters, their gradients and moments) is whole on every
  // rank; only the frozen base is sharded, which no optimizer or checkpoint sees.
  bool sharded() const override { return !frozen_ && world_ > 1; }
  bool weights_sharded() const override { return !frozen_ && world_ > 1; }

  void zero_grads() override {
    if (frozen_) {
      model_.zero_grads();
      return;
    }
    // The reduce-scatters released the arena group by group: it reads as zero already.
    // Otherwise (the first step, one after a skipped exchange) it is zeroed by handing its
    // pages back, not by writing every float: the whole gradient is never resident at once.
    if (!released_) release_zeroed(grads_.data(), grads_.size_bytes());
    released_ = false;
    reduced_ = 0;
  }

  // Every micro-batch is reduced into the shard (as stage 2), group by group as backward
  // finishes them.
  void before_backward(int64_t, int64_t) override {
    if (frozen_) return;
    accumulate_ = reduced_ > 0;
    ++reduced_;
    for (Group& g : groups_) g.grad_pending = g.grad_floats;
    backward_ = true;
  }

  void after_backward() override {
    backward_ = false;
    // The next micro-batch's backward writes the arena the reduce-scatters release. What
    // is still queued here (at least the embedding's reduce-scatter, the last gradient
    // backward finishes) is exposed: the compute lane shows it in a trace.
    {
      TraceSpan span(trace_, "wait for gradient shards", TraceLane::compute);
      queue_.drain();
    }
    reduces_.clear();
  }

  Exchanged exchange(const model::LossSum& local) override {
    queue_.drain();
    reduces_.clear();
    if (frozen_) {
      // On this thread, the queue idle: the adapters' gradients summed whole, as plain data
      // parallelism sums them.
      const model::LossSum global = dp_.all_reduce_gradients(grads_, local);
      return {global, global.num_tokens};
    }
    ++exchanges_;
    released_ = true;
    const model::LossSum global = dp_.all_reduce_loss(local);
    return {global, global.num_tokens};
  }

  std::vector<ArenaRange> owned() const override {
    if (frozen_) return {ArenaRange{0, static_cast<int64_t>(grads_.size())}};
    return owned_;
  }
  std::vector<ArenaRange> sole_owned() const override {
    if (frozen_) return owned();
    std::vector<ArenaRange> sole;
    for (const Group& g : groups_) g.append_sole_owned(sole, rank_);
    return sole;
  }
  std::span<float> owned_grads() override { return frozen_ ? grads_ : shard_grads_.span(); }

  // Under tensor parallelism the arena is this tp rank's local model (each tp rank's dp
  // group shards its own slices): shard_norm.hpp sums the split tensors' squares over tp.
  double grad_sum_squares() override {
    if (frozen_) return GradientSync::grad_sum_squares();
    return sharded_grad_sum_squares(groups_, rank_, shard_grads_.data(), tp_split_, dp_.communicator(),
                                    model_.tensor_parallel());
  }

  // Each rank updated its own chunks: every other rank's copy of them is stale. Nothing is
  // gathered here: the next forward gathers each group as it reaches it.
  // With LoRA the base did not change: what is gathered stays current until a visit
  // releases it.
  void after_update(int64_t step, bool) override {
    step_ = step;
    if (frozen_) return;
    for (size_t j = 0; j < groups_.size(); ++j) release(j);
  }

  // A checkpoint wrote the whole arena: every group is whole (and current) again. (With
  // LoRA it wrote the adapters only; the base is as it was.)
  void weights_restored() override {
    queue_.drain();
    if (frozen_) return;
    for (Group& g : groups_) g.state = Group::State::whole;
  }

  void gather_weights_through(int64_t offset) override {
    const auto target = static_cast<size_t>(&group_at(offset) - groups_.data());
    while (pass_cursor_ <= target) {
      for (size_t j = 0; j < groups_.size(); ++j)
        if (j != pass_cursor_) release(j);
      acquire(pass_cursor_, "whole-model pass");
      ++pass_cursor_;
    }
  }
  void end_weight_pass() override {
    gather_weights_through(groups_.back().end - 1);
    for (size_t j = 0; j < groups_.size(); ++j) release(j);
    pass_cursor_ = 0;
  }

  void take_owned(std::span<const float> whole, std::span<float> owned) const override {
    if (frozen_) {
      GradientSync::take_owned(whole, owned);
      return;
    }
    if (owned.size() != shard_grads_.size() || whole.size() != params_.size())
      throw Error("parallel/zero3", fmt::format("a shard of {} floats and a whole of {} were given; this rank owns {} "
                                                "of {}",
                                                owned.size(), whole.size(), shard_grads_.size(), params_.size()));
    for (const Group& g : groups_) {
      std::copy_n(whole.begin() + g.chunk_of(rank_).begin, g.chunk, owned.begin() + g.chunk_slot);
      std::copy_n(whole.begin() + g.tail().begin, g.tail_size(), owned.begin() + g.tail_slot);
    }
  }

  int64_t bytes_sent() const override { return bytes_ + (frozen_ ? dp_.gradient_bytes_sent() : 0); }
  int64_t exchanges() const override { return frozen_ ? dp_.gradient_exchanges() : exchanges_; }

 private:
  size_t index_of(model::ParamGroup pg) const {
    switch (pg.kind) {
      case model::ParamGroup::Kind::embedding: return 0;
      case model::ParamGroup::Kind::block: return static_cast<size_t>(pg.layer) + 1;
      case model::ParamGroup::Kind::head: return groups_.size() - 1;
    }
    return 0;
  }
  size_t head() const { return groups_.size() - 1; }

  // A 4-bit base: each group's quantized matrices are a contiguous run of the packed arena
  // (slots in layout order, groups in arena order), cut over the ranks as the floats are.
  // This rank copies only its chunks and the tails out of the model files into the arena
  // (Llama::own_quantized), which lets the mapped files go: the rest arrives by gathers.
  void cut_packed_base() {
    const std::vector<model::ElementRange> places = model_.packed_places();
    std::vector<int64_t> first(groups_.size(), -1), last(groups_.size(), -1);
    size_t previous = 0;
    for (const model::ParamInfo& info : model_.layout().params()) {
      if (!info.quantized) continue;
      const size_t g = packed_group_of(info.name, groups_.size());
      if (g >= groups_.size() || g < previous)
        throw Error(kZero3Component, fmt::format("quantized tensor {} is out of the groups' order", info.name));
      previous = g;
      if (first[g] < 0) first[g] = info.quant_slot;
      last[g] = info.quant_slot;
    }
    std::vector<model::ElementRange> mine;
    for (size_t g = 0; g < groups_.size(); ++g) {
      // A group without quantized matrices gets an empty cut where the previous one ended.
      const int64_t at = g == 0 ? 0 : groups_[g - 1].packed.end;
      const int64_t begin = first[g] < 0 ? at : places[static_cast<size_t>(first[g])].begin;
      const int64_t end = first[g] < 0 ? at : places[static_cast<size_t>(last[g])].end;
      if (begin != at)
        throw Error(kZero3Component, fmt::format("group {}'s quantized matrices do not follow the previous group's", groups_[g].name));
      groups_[g].packed = ChunkCut(begin, end, world_);
      groups_[g].packed.append_owned(mine, rank_);
    }
    packed_ = model_.own_quantized(mine);
  }

  // Forward reads group g now: it is made whole (its prefetch waited for, or gathered now),
  // the next group's gather starts on the communication thread, and every other group is
  // released. A tied lm_head is the embedding's weight: the head needs both.
  void before_group_forward(model::ParamGroup pg) override { visit(index_of(pg), +1); }
  // Backward: the same in reverse order (gradient checkpointing's recompute of a block runs
  // inside its backward, on the weights gathered for it).
  void before_group_backward(model::ParamGroup pg) override { visit(index_of(pg), -1); }

  // The embedding's backward reads no weight: it adds the rows' gradients into the
  // embedding's gradient (Llama::backward's embedding_backward; a tied lm_head's product is
  // the head's backward, which gathers the embedding). Not gathering it there saves the
  // largest group's second gather. With LoRA, backward stops in the lowest adapted block
  // (nothing below is trained): the blocks below it are not read either.
  bool reads_weights(size_t g, int direction) const {
    if (direction > 0) return true;
    if (g == 0) return false;
    return g == head() || static_cast<int64_t>(g) - 1 >= lowest_trained_;
  }

  void visit(size_t g, int direction) {
    if (g == 0 && direction > 0) ++pass_;
    const char* why = direction > 0 ? "forward" : "backward";
    std::array<size_t, 4> keep{};
    size_t kept = 0;
    if (reads_weights(g, direction)) keep[kept++] = g;
    if (tied_ && g == head()) keep[kept++] = 0;
    for (size_t i = 0; i < kept; ++i) acquire(keep[i], why);
    const size_t first_prefetch = kept;
    const auto next = static_cast<int64_t>(g) + direction;
    if (next >= 0 && next < static_cast<int64_t>(groups_.size()) && reads_weights(static_cast<size_t>(next), direction)) {
      keep[kept++] = static_cast<size_t>(next);
      if (tied_ && static_cast<size_t>(next) == head()) keep[kept++] = 0;
    }
    for (size_t i = first_prefetch; i < kept; ++i) prefetch(keep[i], why);
    // Forward's last group is backward's first: the head, then the last block, which
    // forward has just read. It stays whole across the turn (as FSDP keeps its last layer)
    // rather than being released and gathered again: at the head there are then the head,
    // that block and (tied) the embedding, as in backward at the head with the block
    // being gathered.
    if (direction > 0 && g == head() && g >= 1 && reads_weights(g - 1, -1)) keep[kept++] = g - 1;
    for (size_t j = 0; j < groups_.size(); ++j)
      if (std::find(keep.begin(), keep.begin() + static_cast<std::ptrdiff_t>(kept), j) ==
          keep.begin() + static_cast<std::ptrdiff_t>(kept))
        release(j);
  }

  // Starts group j's all-gather on the communication thread unless it is whole or coming.
  // The collective's name carries the group, the pass and the step: ranks whose gather
  // schedules differ get a MismatchError naming both, never a hang (comm/signature.hpp).
  void prefetch(size_t j, const char* why) {
    Group& g = groups_[j];
    if (g.state != Group::State::released) return;
    g.state = Group::State::gathering;
    if ((g.chunk == 0 && g.packed.chunk == 0) || world_ == 1) {  // nothing another rank holds
      g.state = Group::State::whole;
      return;
    }
    const std::span<float> part = params_.subspan(static_cast<size_t>(g.begin), static_cast<size_t>(g.chunk * world_));
    // A 4-bit base's packed words, gathered as floats: an all-gather only copies them.
    const std::span<float> packed =
        packed_.subspan(static_cast<size_t>(g.packed.begin), static_cast<size_t>(g.packed.chunk * world_));
    std::string name = fmt::format("{} weights, {} {} of step {}", g.name, why, pass_, step_ + 1);
    bytes_ += comm::ring_all_gather_bytes((g.chunk + g.packed.chunk) * kParamBytes, static_cast<int>(world_));
    ++gathers_;
    g.ticket = queue_.push("gather " + g.name, [this, part, packed, name = std::move(name)] {
      if (!part.empty()) dp_.reducer().all_gather(part, comm::Options{.name = name});
      if (!packed.empty()) dp_.reducer().all_gather(packed, comm::Options{.name = name + " (4-bit)"});
    });
  }

  void acquire(size_t j, const char* why) {
    prefetch(j, why);
    Group& g = groups_[j];
    if (g.state == Group::State::gathering) {
      // What the prefetch did not hide: the compute lane shows it in a trace.
      TraceSpan span(trace_, "wait for " + g.name + " weights", TraceLane::compute);
      queue_.wait(g.ticket);
      g.state = Group::State::whole;
    }
  }

  // Group j's weights of other ranks are no longer needed: the whole pages among them go
  // back to the operating system (the partial pages at their ends stay, as they are:
  // a neighbour's floats or this rank's own share them). With poison_, every such float
  // becomes NaN instead, so that a read of a weight not gathered shows in the loss.
  void release(size_t j) {
    Group& g = groups_[j];
    if (g.state == Group::State::released) return;
    if (g.state == Group::State::gathering) queue_.wait(g.ticket);
    g.state = Group::State::released;
    if (world_ == 1) return;
    release_others(params_.data(), g);
    release_others(packed_.data(), g.packed);
    // --dtype bf16: the group's bf16 copy goes with its floats (all of it, this rank's
    // chunk's too: it is made again from the gathered floats on the group's next use).
    if (bf16_) model_.drop_bf16({g.begin, g.end}, poison_);
  }

  // The floats of `arena` in other ranks' chunks of `cut`, handed back (or poisoned).
  void release_others(float* params, const ChunkCut& cut) {
    if (cut.chunk == 0) return;
    const std::array<ArenaRange, 2> others = {ArenaRange{cut.begin, cut.chunk_of(rank_).begin},
                                              ArenaRange{cut.chunk_of(rank_).end, cut.tail().begin}};
    for (const ArenaRange& r : others) {
      if (r.size() <= 0) continue;
      if (poison_) {
        std::fill(params + r.begin, params + r.end, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      // Whole pages only: the arena is page aligned (base/buffer.hpp maps it).
      const uintptr_t base = reinterpret_cast<uintptr_t>(params);
      const int64_t page = page_floats_;
      const int64_t skew = static_cast<int64_t>((base / kParamBytes) % static_cast<uintptr_t>(page));
      const int64_t first = ((r.begin + skew + page - 1) / page) * page - skew;
      const int64_t last = ((r.end + skew) / page) * page - skew;
      if (last > first) release_zeroed(params + first, static_cast<size_t>((last - first) * kParamBytes));
    }
  }

  Group& group_at(int64_t offset) {
    const auto it = std::partition_point(groups_.begin(), groups_.end(), [&](const Group& g) { return g.end <= offset; });
    if (it == groups_.end() || offset < it->begin)
      throw Error("parallel/zero3", fmt::format("no group holds float {} of the arena", offset));
    return *it;
  }

  // Backward finished this range: once its group's last range is in, the group's gradient
  // is reduce-scattered on the communication thread.
  void grad_ready(model::GradSpan s) override {
    if (!backward_ || frozen_) return;
    Group& g = group_at(s.begin);
    g.grad_pending -= s.end - s.begin;
    if (g.grad_pending != 0) return;
    reduces_.push_back(queue_.push("reduce-scatter " + g.name, [this, j = static_cast<size_t>(&g - groups_.data()),
                                                                  accumulate = accumulate_] { reduce(j, accumulate); }));
    if (g.chunk > 0) bytes_ += comm::ring_reduce_scatter_bytes(g.chunk * world_ * kParamBytes, static_cast<int>(world_));
    const int64_t tail = g.tail_size();
    if (tail > 0) bytes_ += comm::ring_all_reduce_bytes(tail * kParamBytes, static_cast<int>(world_));
    // Backward waits here rather than fill the arena when it outruns the network.
    while (reduces_.size() > kReducesInFlight) {
      queue_.wait(reduces_.front());
      reduces_.pop_front();
    }
  }

  // Group j's gradient from every rank: reduce-scattered into this rank's chunk slot, the
  // tail all-reduced into the tail slot (added to what earlier micro-batches left there);
  // then its part of the gradient arena goes back to the operating system.
  void reduce(size_t j, bool accumulate) {
    const Group& g = groups_[j];
    const std::span<float> part = grads_.subspan(static_cast<size_t>(g.begin), static_cast<size_t>(g.end - g.begin));
    if (g.chunk > 0) {
      const std::span<float> chunks = part.first(static_cast<size_t>(g.chunk * world_));
      dp_.reducer().reduce_scatter(chunks, comm::ReduceOp::sum, comm::Options{.name = "gradient shards"});
      const float* mine = chunks.data() + rank_ * g.chunk;
      float* slot = shard_grads_.data() + g.chunk_slot;
      if (accumulate) kernels::add_inplace(slot, mine, g.chunk);
      else std::copy_n(mine, g.chunk, slot);
    }
    const int64_t tail = g.tail_size();
    if (tail > 0) {
      const std::span<float> t = part.subspan(static_cast<size_t>(g.chunk * world_));
      dp_.communicator().all_reduce(t, comm::ReduceOp::sum, comm::Options{.name = "gradient tail"});
      float* slot = shard_grads_.data() + g.tail_slot;
      if (accumulate) kernels::add_inplace(slot, t.data(), tail);
      else std::copy(t.begin(), t.end(), slot);
    }
    release_zeroed(part.data(), part.size_bytes());
  }

  DataParallel& dp_;
  std::span<float> params_, grads_;  // the model's arenas (P,): weights and gradients
  std::span<float> packed_;          // a 4-bit base's packed arena (Llama::own_quantized); empty without
  const int64_t world_;  // N
  const int64_t rank_;
  const bool poison_;
  const bool frozen_;               // LoRA: the groups are the frozen base's, nothing of them reduced
  const bool bf16_;                 // --dtype bf16: the model keeps bf16 copies of what it reads
  int64_t lowest_trained_ = 0;      // LoRA: the lowest adapted block, where backward stops
  TraceRecorder* trace_;
  bool tied_ = false;
  int64_t page_floats_ = 1024;
  std::vector<Group> groups_;       // ascending in the arena: embedding, blocks, head
  std::vector<ArenaRange> owned_;   // this rank's chunks and every tail, ascending
  std::vector<ArenaRange> tp_split_;  // tensor parallel: the arena's slices of split tensors (ascending)
  Buffer<float> shard_grads_;       // the owned ranges' summed gradients
  std::deque<uint64_t> reduces_;    // tickets of the reduce-scatters not yet waited for
  bool backward_ = false;
  int64_t reduced_ = 0;             // micro-batches reduced into the shard this step
  bool accumulate_ = false;         // the current one adds to the shard (not the first)
  bool released_ = false;
  int64_t pass_ = 0;                // forwards begun (at the embedding)
  int64_t step_ = 0;                // optimizer steps done
  size_t pass_cursor_ = 0;          // gather_weights_through's next group
  int64_t bytes_ = 0, exchanges_ = 0, gathers_ = 0;
  CommQueue queue_;                 // last: its thread stops first
};

}  // namespace

std::vector<ArenaRange> zero3_owned_ranges(const model::ModelConfig& cfg, const model::ParamLayout& layout,
                                           int64_t world, int64_t rank) {
  if (world < 1 || rank < 0 || rank >= world)
    throw Error("parallel/zero3", fmt::format("rank {} of {} ranks", rank, world));
  std::vector<ArenaRange> owned;
  for (const GroupBounds& b : group_bounds(cfg, layout, layout.total_numel()))
    ChunkCut(b.begin, b.end, world).append_owned(owned, rank);
  return owned;
}

std::unique_ptr<GradientSync> make_zero3_sync(model::Llama& model, DataParallel& dp, const Zero3Options& options,
                                              TraceRecorder* trace) {
  if (model.quantized() && !model.base_frozen())
    throw InputError("parallel", "--zero 3 trains no 4-bit base: its packed weights are frozen; pass --fine-tune-type lora");
  const model::Llama::LayerRange range = model.layer_range();
  if (range.begin != 0 || range.end != model.config().n_layers)
    throw InputError("parallel", "--zero 3 cannot be combined with pipeline stages: it gathers the whole model's groups");
  return std::make_unique<Zero3Sync>(model, dp, options, trace);
}

}  // namespace flotilla::parallel
