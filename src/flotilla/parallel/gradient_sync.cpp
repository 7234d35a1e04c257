#include "flotilla/parallel/gradient_sync.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "flotilla/base/error.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/parallel/deterministic_sync.hpp"
#include "flotilla/parallel/zero.hpp"
#include "flotilla/parallel/zero3.hpp"

namespace flotilla::parallel {

double GradientSync::grad_sum_squares() {
  const std::span<float> g = owned_grads();
  return kernels::sum_squares(g.data(), static_cast<int64_t>(g.size()));
}

void GradientSync::take_owned(std::span<const float> whole, std::span<float> owned) const {
  if (owned.size() != whole.size()) throw Error("parallel", "take_owned: the buffers differ in size");
  std::copy(whole.begin(), whole.end(), owned.begin());
}

namespace {

// One process: the gradient is already the whole batch's.
class SingleRank final : public GradientSync {
 public:
  explicit SingleRank(model::Llama& model) : GradientSync(model) {}
  std::string name() const override { return "single rank"; }
  Exchanged exchange(const model::LossSum& local) override { return {local, local.num_tokens}; }
};

// Sums of per-token gradients and token counts added over the ranks; divided by the
// global count they are the global batch's mean-loss gradient (data_parallel.hpp).
class AllReduceSync final : public GradientSync {
 public:
  AllReduceSync(model::Llama& model, DataParallel& dp) : GradientSync(model), dp_(dp) {}
  std::string name() const override {
    return dp_.codec().kind() == comm::Compression::none ? "all-reduce"
                                                         : fmt::format("all-reduce, {} compression",
                                                                       comm::compression_name(dp_.codec().kind()));
  }
  Exchanged exchange(const model::LossSum& local) override {
    const model::LossSum global = dp_.all_reduce_gradients(model_.trainable().grads, local);
    return {global, global.num_tokens};
  }
  int64_t bytes_sent() const override { return dp_.gradient_bytes_sent(); }
  int64_t exchanges() const override { return dp_.gradient_exchanges(); }

 private:
  DataParallel& dp_;
};

// Exact gradients in fusion buckets, each all-reduced on the communication thread as soon
// as the last micro-batch's backward has finished it.
class OverlappedSync final : public GradientSync, private model::ParallelContext {
 public:
  OverlappedSync(model::Llama& model, DataParallel& dp, double bucket_mb, TraceRecorder* trace)
      : GradientSync(model), dp_(dp) {
    model_.set_parallel_context(this);
    std::vector<comm::GradRange> order;
    for (const model::GradSpan& s : model_.grad_ready_order()) order.push_back({s.begin, s.end});
    dp_.enable_overlap(order, static_cast<int64_t>(bucket_mb * 1024 * 1024), trace);
  }
  ~OverlappedSync() override { model_.set_parallel_context(nullptr); }
  std::string name() const override { return "overlapped buckets"; }
  std::string signature() const override { return fmt::format("{}, {} buckets", name(), dp_.overlap()->buckets().size()); }
  bool overlapped() const override { return true; }
  // Accumulation never exchanges on the inner micro-batches.
  void before_backward(int64_t micro, int64_t micro_batches) override {
    active_ = micro == micro_batches - 1;
    if (active_) dp_.overlap()->begin(model_.trainable().grads);
  }
  void after_backward() override { active_ = false; }
  Exchanged exchange(const model::LossSum& local) override {
    const model::LossSum global = dp_.finish_overlapped_gradients(local);
    return {global, global.num_tokens};
  }
  int64_t bytes_sent() const override { return dp_.gradient_bytes_sent(); }
  int64_t exchanges() const override { return dp_.gradient_exchanges(); }

 private:
  // Backward finished this range: its bucket may go (on the last micro-batch only).
  void grad_ready(model::GradSpan s) override {
    if (active_) dp_.overlap()->ready({s.begin, s.end});
  }

  DataParallel& dp_;
  bool active_ = false;
};

// Each rank steps on its own gradient; only the loss is summed, to report the global
// batch's (16 bytes). The weights meet every H steps (local_sgd.hpp).
class LocalSgdSync final : public GradientSync {
 public:
  LocalSgdSync(model::Llama& model, DataParallel& dp, const LocalSgdConfig& config)
      : GradientSync(model), dp_(dp), local_(dp, config, model.trainable().params) {}
  std::string name() const override { return "local SGD"; }
  Exchanged exchange(const model::LossSum& local) override { return {dp_.all_reduce_loss(local), local.num_tokens}; }
  // The gradients are each rank's own, so the ranks ask each other.
  bool agree_finite(bool finite) override { return dp_.max_over_ranks(finite ? 0 : 1, "non-finite step") == 0; }
  void after_update(int64_t step, bool last) override { local_.after_step(model_.trainable().params, step, last); }
  // The restored weights are the last meeting's (checkpoints are taken at meetings).
  void weights_restored() override { local_.reset_anchor(model_.trainable().params); }
  std::vector<RankState> rank_state() override {
    if (local_.outer_momentum().empty()) return {};
    return {RankState{"local_sgd.outer_momentum", local_.outer_momentum()}};
  }
  int64_t bytes_sent() const override { return local_.bytes_sent(); }
  int64_t exchanges() const override { return local_.meetings(); }

 private:
  DataParallel& dp_;
  LocalSgd local_;
};

}  // namespace

void validate_sync(const SyncConfig& config, comm::Compression compression) {
  if (config.deterministic) {
    // Each of these changes what is summed or how, per rank: not exact integers of the rows.
    if (config.zero_stage == 3)
      throw InputError("parallel", "--deterministic cannot be combined with --zero 3 yet: it shards the weights, which "
                                   "a row's backward reads whole; use --zero 1 or 2");
    if (config.local_sgd.sync_every > 0)
      throw InputError("parallel", "--deterministic cannot be combined with --sync-every: local SGD steps on each "
                                   "rank's own gradients, which depend on the world size");
    if (compression != comm::Compression::none)
      throw InputError("parallel", fmt::format("--deterministic cannot be combined with --compression {}: the rounding "
                                               "of a compressed gradient depends on how it was split over the ranks",
                                               comm::compression_name(compression)));
  }
  if (config.zero_stage < 0 || config.zero_stage > 3)
    throw InputError("parallel", fmt::format("--zero must be 0 (off), 1 (optimizer state sharded), 2 (and gradients) "
                                             "or 3 (and weights); not {}",
                                             config.zero_stage));
  if (config.zero_stage > 0 && config.local_sgd.sync_every > 0)
    throw InputError("parallel", "--zero cannot be combined with --sync-every: local SGD keeps a whole optimizer on "
                                 "every rank and exchanges weights, not gradients");
  if (config.zero_stage > 0 && compression != comm::Compression::none && compression != comm::Compression::fp16 &&
      compression != comm::Compression::bf16)
    throw InputError("parallel", fmt::format("--zero cannot be combined with --compression {}: ZeRO reduce-scatters the "
                                             "gradient, in float32 or in halves (--compression fp16 or bf16); top-k "
                                             "and PowerSGD need every rank's whole gradient",
                                             comm::compression_name(compression)));
  if (config.zero_stage == 3 && compression != comm::Compression::none)
    throw InputError("parallel", fmt::format("--zero 3 cannot be combined with --compression {} yet: stage 3 "
                                             "reduce-scatters its gradients in float32 (stages 1 and 2 take fp16 "
                                             "and bf16)",
                                             comm::compression_name(compression)));
}

std::unique_ptr<GradientSync> make_gradient_sync(model::Llama& model, DataParallel* dp, const SyncConfig& config,
                                                 TraceRecorder* trace) {
  validate_sync(config, dp ? dp->codec().kind() : comm::Compression::none);
  if (!dp && config.deterministic) return make_deterministic_sync(model, nullptr);
  if (!dp) return std::make_unique<SingleRank>(model);
  std::unique_ptr<GradientSync> sync;
  if (config.deterministic) {
    sync = make_deterministic_sync(model, dp, config.zero_stage);
  } else if (config.zero_stage == 3) {
    sync = make_zero3_sync(model, *dp, Zero3Options{.poison_released = config.zero_poison}, trace);
  } else if (config.zero_stage > 0) {
    sync = make_zero_sync(model, *dp, config.zero_stage, config.bucket_mb, trace);
  } else if (config.local_sgd.sync_every > 0) {
    sync = std::make_unique<LocalSgdSync>(model, *dp, config.local_sgd);
  } else if (dp->world() > 1 && config.bucket_mb > 0.0 && dp->codec().kind() == comm::Compression::none) {
    // Overlap needs every rank's exact gradient per step: not with a compressing codec (it
    // needs the whole gradient at once).
    sync = std::make_unique<OverlappedSync>(model, *dp, config.bucket_mb, trace);
  } else {
    sync = std::make_unique<AllReduceSync>(model, *dp);
  }
  dp->check_same("gradient sync settings (--zero, --bucket-mb, --sync-every, --compression, --deterministic)",
                 sync->signature());
  return sync;
}

}  // namespace flotilla::parallel
