// How the ranks of a data-parallel job combine their work each step: one interface, one
// implementation per mode. The Trainer runs the same step for every mode and asks its
// GradientSync at each point where the modes differ:
//
//   zero_grads()            the step begins (ZeRO-2 may find its released arena zero already)
//   before/after_backward   around each micro-batch's backward (overlap arms its buckets
//                           for the last one)
//   per_row(), row_done()   deterministic mode: backward one group of rows at a time,
//                           each group's gradient handed over (and the buffer cleared)
//   exchange(loss)          after the last backward: gradients combined, the global loss
//   owned(), owned_grads()  the ranges of the flat arena this rank updates and their
//                           combined gradients (everything but under ZeRO)
//   grad_sum_squares()      the squared global gradient norm, from the owned gradients
//   agree_finite(ok)        whether every rank may apply the update (local SGD asks them)
//   after_update(step)      ZeRO gathers the updated shards; local SGD meets every H steps
//
// Modes (make_gradient_sync):
//   single rank       no data parallelism: nothing to exchange
//   all-reduce        the whole gradient in one exchange through DataParallel's codec
//                     (exact float32 by the chosen algorithm, or compressed)
//   overlapped        fusion buckets reduced on a communication thread during backward
//   local SGD         no gradient exchange; weights averaged every H steps
//   ZeRO-1, ZeRO-2    the gradient reduce-scattered into this rank's shard of the flat
//                     arena, AdamW's moments for that shard only, the updated shards
//                     all-gathered (parallel/zero.hpp)
//   ZeRO-3            the weights sharded too: each parameter group gathered just before
//                     forward or backward reads it, released after (parallel/zero3.hpp);
//                     with LoRA the frozen base so, the adapters all-reduced whole
//   deterministic     rows run in fixed groups, each group's gradient added in fixed-point
//                     integers, one int64 all-reduce: the same bits for any world size
//                     (parallel/deterministic_sync.hpp; with ZeRO-1/2 a reduce-scatter)
//
// Every mode counts the bytes this rank sends through comm/wire_bytes.hpp.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/trace.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/parallel/data_parallel.hpp"
#include "flotilla/parallel/local_sgd.hpp"

namespace flotilla::parallel {

// [begin, end) of the flat trainable arena, in floats (the model's own range type: a
// shard is also what a rank builds of the model, model::Llama::init_random).
using ArenaRange = model::ElementRange;

// A buffer of state this rank alone holds that an exact resume needs (local SGD's outer
// momentum): a sharded checkpoint saves it in the rank's own file and restores it on the
// same world size.
struct RankState {
  std::string name;
  std::span<float> data;
};

struct SyncConfig {
  LocalSgdConfig local_sgd;  // sync_every > 0: local SGD / DiLoCo
  double bucket_mb = 25.0;   // exact all-reduce: overlap buckets of this many MiB; 0: none
  int zero_stage = 0;        // 1, 2, 3: ZeRO (sharded optimizer state; + gradients; + weights)
  bool zero_poison = false;  // ZeRO-3 test mode: released weights read NaN (zero3.hpp)
  bool deterministic = false;  // the same bits for any world size (deterministic_sync.hpp)
};

// What an exchange returns: the loss summed over the ranks (what the step reports), and
// the number of target tokens the owned gradients are sums over (the divisor that makes
// them the gradient of the mean token loss: global, or this rank's own under local SGD).
struct Exchanged {
  model::LossSum global;
  int64_t grad_tokens = 0;
};

class GradientSync {
 public:
  virtual ~GradientSync() = default;
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  // "single rank", "all-reduce", "overlapped buckets", "local SGD", "ZeRO-1", ...
  virtual std::string name() const = 0;
  // What every rank's mode must agree on (its name and the units it exchanges): checked
  // when the mode is made, so ranks started with different flags stop with one line that
  // names them instead of a mismatched collective later.
  virtual std::string signature() const { return name(); }
  virtual void zero_grads() { model_.zero_grads(); }
  virtual void before_backward(int64_t /*micro*/, int64_t /*micro_batches*/) {}
  virtual void after_backward() {}
  // Whether the trainer must run forward and backward one group of rows (sequences,
  // TrainConfig::deterministic_group) at a time and call row_done after each group's
  // backward, with that group's loss (its sum and target tokens). A group without target
  // tokens may be left out (its gradient is zero).
  virtual bool per_row() const { return false; }
  virtual void row_done(const model::LossSum& /*row*/) {}
  virtual Exchanged exchange(const model::LossSum& local) = 0;
  // Ascending, disjoint; the whole arena unless sharded.
  virtual std::vector<ArenaRange> owned() const { return {ArenaRange{0, static_cast<int64_t>(model_.trainable().params.size())}}; }
  virtual std::span<float> owned_grads() { return model_.trainable().grads; }
  virtual double grad_sum_squares();
  virtual bool agree_finite(bool finite) { return finite; }
  // After optimizer step `step` (1-based; its update may have been skipped), `last` when
  // it is the run's final step.
  virtual void after_update(int64_t /*step*/, bool /*last*/) {}
  // Resume: the weights were replaced by a checkpoint's.
  virtual void weights_restored() {}
  // Makes every rank's model hold all of the current weights, for what reads the whole
  // model (validation, the saved model): a pipeline stage updates only its own layers and
  // gets the others' here, an expert-parallel rank with LoRA the other experts' adapters.
  // Every rank calls it alike; nothing to do for the other modes.
  virtual void complete_weights() {}
  // This rank's own state (RankState), restored into these spans after weights_restored.
  virtual std::vector<RankState> rank_state() { return {}; }

  // This rank's part, laid out as owned() (optimizer moments), of a buffer in the whole
  // arena's layout (an unsharded checkpoint's moments, read on resume): the owned ranges
  // copied out, no collective. Sharded checkpoints never need the whole moments
  // (train/sharded_checkpoint.hpp).
  virtual void take_owned(std::span<const float> whole, std::span<float> owned) const;

  // What this rank sent for its gradients and weights so far (comm/wire_bytes.hpp), and in
  // how many exchanges.
  virtual int64_t bytes_sent() const { return 0; }
  virtual int64_t exchanges() const { return 0; }
  // Whether owned() is less than the whole arena (ZeRO).
  virtual bool sharded() const { return false; }
  // When sharded(): owned() less what other ranks own too (ZeRO's unit tails, which rank 0
  // alone keeps), so that every float of the arena is in exactly one rank's sole_owned()
  // (what a sharded checkpoint's rank files hold). Ascending, disjoint.
  virtual std::vector<ArenaRange> sole_owned() const { return owned(); }
  // Whether the exchange only waits for buckets reduced during backward.
  virtual bool overlapped() const { return false; }

  // ZeRO-3: whether the weights outside owned() are whole only while the model's hooks
  // have gathered them. A reader of the whole weights (the final model's writer) then walks
  // the arena in ascending order: gather_weights_through(offset) makes the group holding
  // that float whole, releasing the ones before it, and end_weight_pass() finishes the walk
  // (gathering what is left, so that every rank gathers every group) and releases all.
  // Collectives: every rank walks alike. Without sharded weights both do nothing.
  virtual bool weights_sharded() const { return false; }
  virtual void gather_weights_through(int64_t /*offset*/) {}
  virtual void end_weight_pass() {}

 protected:
  explicit GradientSync(model::Llama& model) : model_(model) {}
  model::Llama& model_;
};

// InputError naming the flags when the combination cannot run: ZeRO with local SGD, with
// compression, a stage other than 0, 1, 2, 3; --deterministic with ZeRO-3, local SGD or
// compression.
void validate_sync(const SyncConfig& config, comm::Compression compression);

// The mode `config` asks for over `dp` (null: one process). `dp` and `model` must outlive
// it; `trace` (may be null) records the communication thread's buckets.
std::unique_ptr<GradientSync> make_gradient_sync(model::Llama& model, DataParallel* dp, const SyncConfig& config,
                                                 TraceRecorder* trace);

}  // namespace flotilla::parallel
