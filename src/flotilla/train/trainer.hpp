// The single-process training loop: micro-batches from a BatchSource, gradient
// accumulation, global-norm clipping, AdamW with warm-up + cosine schedule.
//
// Gradients are accumulated as sums of per-token gradients and divided once by the
// number of target tokens of the whole accumulation window, so the update is the
// gradient of the window's mean token loss whatever the split into micro-batches (and,
// later, into ranks).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/trace.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/parallel/data_parallel.hpp"
#include "flotilla/parallel/expert_parallel.hpp"
#include "flotilla/parallel/gradient_sync.hpp"
#include "flotilla/parallel/local_sgd.hpp"
#include "flotilla/parallel/pipeline.hpp"
#include "flotilla/parallel/row_balance.hpp"
#include "flotilla/train/adamw.hpp"
#include "flotilla/train/schedule.hpp"

namespace flotilla::train {

// What a step whose loss or gradient norm is not finite (NaN, Inf) does: `stop` throws
// NonFiniteStep before the update, `skip` drops the step's update (the step still counts,
// and its data is consumed). Either way no non-finite value reaches the weights or the
// optimizer state.
enum class NonFinitePolicy { stop, skip };

struct TrainConfig {
  int64_t batch_size = 4;       // B, sequences per micro-batch
  int64_t seq_len = 128;        // T
  int64_t grad_accum = 1;       // micro-batches per optimizer step
  int64_t steps = 100;          // optimizer steps
  float lr = 3e-4f;
  float min_lr = 3e-5f;
  int64_t warmup_steps = 10;
  float grad_clip = 1.0f;       // max global L2 norm; <= 0 disables
  AdamWConfig adamw;
  int64_t eval_every = 0;       // steps between validation passes; 0: only at the end
  int64_t eval_batches = 8;     // <= 0: one whole pass of the validation data
  NonFinitePolicy on_nonfinite = NonFinitePolicy::stop;
  // Data parallel: with sync_every > 0, local SGD / DiLoCo (parallel/local_sgd.hpp) in
  // place of the per-step gradient all-reduce.
  parallel::LocalSgdConfig local_sgd;
  // Data parallel, exact gradients: fusion buckets of this many MiB reduced on a
  // communication thread while backward runs (PyTorch DDP's default size). 0: one
  // all-reduce after backward.
  double bucket_mb = 25.0;
  // Data parallel: ZeRO stage (parallel/zero.hpp, zero3.hpp). 1: AdamW's moments sharded
  // over the ranks; 2: the gradients too; 3: the weights too. 0: every rank holds everything.
  int zero_stage = 0;
  // ZeRO-3 test mode (the environment's FLOTILLA_ZERO_POISON=1 for `flotilla train`): the
  // weights a rank released read NaN, so that a read of one not gathered shows.
  bool zero_poison = false;
  // Data parallel: the same model bytes for any number of ranks, any split of the global
  // batch and any thread count (parallel/deterministic_sync.hpp): rows run in fixed groups,
  // their gradients summed in fixed-point integers, LoRA dropout keyed by the global row.
  bool deterministic = false;
  // Deterministic mode: rows per group, the unit that runs forward and backward as one
  // batch and whose gradient is folded once (parallel/deterministic_sync.hpp). Part of what
  // fixes the bytes (the same group gives the same bytes for any world size and thread
  // count); every rank's micro-batch must be a whole number of groups. 1: rows one at a time.
  int64_t deterministic_group = 1;
  // Data parallel, row balancing (parallel/row_balance.hpp): > 0 cuts each global batch
  // into per-rank shares that follow the ranks' measured speeds, agreed on every this many
  // steps; 0: equal shares. With it, the BatchSource passed to step() and run() yields the
  // whole global batch (as one process reading for every rank would: micro-batches of
  // world x batch_size rows, grad_accum of them per step) and each rank keeps its share.
  int64_t balance_every = 0;
  // Test hook (the environment's FLOTILLA_TEST_SLOW_RANK=rank:factor for `flotilla
  // train`): this rank's forward and backward take `factor` times as long (it sleeps the
  // difference before each micro-batch's backward, or after its rows in the deterministic
  // mode), to stand for a slower machine. 1: off.
  double test_slow_factor = 1.0;
};

struct StepMetrics {
  int64_t step = 0;             // 1-based: steps completed
  int64_t total_steps = 0;
  double loss = 0.0;            // mean token loss over the accumulation window
  float lr = 0.0f;
  double grad_norm = 0.0;       // before clipping
  // Global batches drawn before this step's that held no target token (every example's
  // targets past the row): skipped, neither stepped on nor counted as a step.
  int64_t skipped_batches = 0;
  int64_t tokens = 0;           // input tokens processed this step (B * T * accum)
  double step_s = 0.0;
  // Where step_s went (they add up to it, less a few microseconds of bookkeeping): drawing
  // the micro-batches, forward + backward, the data-parallel all-reduce (0 alone), and
  // scaling, clipping and the optimizer update. The planner's cost model is fitted to these.
  double data_s = 0.0;
  double compute_s = 0.0;
  double sync_s = 0.0;
  double update_s = 0.0;
  double tokens_per_s = 0.0;
  double elapsed_s = 0.0;
  bool skipped = false;         // loss or gradient norm not finite: no update (NonFinitePolicy::skip)
  // A mixture of experts: the load-balancing loss (Llama::router_aux_loss) of this rank's
  // micro-batches, weighted by their target tokens; not part of `loss`. Absent for a dense
  // model.
  std::optional<double> router_aux_loss;
  // A mixture of experts: the share of the step's expert assignments dropped over capacity
  // (train --expert-capacity), the mean over its micro-batches, all ranks' tokens; absent
  // for a dense model, 0 when dropless.
  std::optional<double> expert_dropped;
  // Row balancing (TrainConfig::balance_every): the rows each rank ran this step, in rank
  // order; their sum is the global batch and rank r's rows follow rank r - 1's. Empty
  // without balancing (equal shares).
  std::vector<int64_t> rank_rows;
  // Row balancing, on a step that ended a window: each rank's smoothed speed (rows per
  // second of forward and backward) from which the next steps' shares were cut.
  std::vector<double> rank_rows_per_s;
};

// A step whose loss or gradient norm is not finite under NonFinitePolicy::stop; nothing of
// the step was applied (the weights and optimizer are those after step `metrics.step` - 1).
class NonFiniteStep : public Error {
 public:
  NonFiniteStep(std::string_view what, const StepMetrics& metrics) : Error("train", what), metrics_(metrics) {}
  const StepMetrics& metrics() const { return metrics_; }

 private:
  StepMetrics metrics_;
};

// InputError naming the flag when a value is outside its domain: a learning rate that is
// negative or not finite, betas outside [0, 1), negative or non-finite weight decay, clip,
// warm-up, and the like. The Trainer checks it too; a job calls it before loading anything.
void validate_train_config(const TrainConfig& cfg);

struct EvalMetrics {
  int64_t step = 0;
  double loss = 0.0;
  int64_t tokens = 0;
};

// Mean token loss over the batches `next` yields, until it returns false or after
// max_batches (0: no limit; `next` must then end by itself). Forward only. With
// `pipeline` (this rank's stage; every stage calls it alike) each batch runs through the
// stages and every stage returns the replica's loss.
EvalMetrics evaluate_loss(model::Llama& model, const std::function<bool(data::Batch&)>& next, int64_t max_batches,
                          parallel::PipelineStage* pipeline = nullptr);

// How many batches of `rows` windows of T tokens a validation pass over `valid` reads:
// `requested`, but at most one pass (the source wraps around and never ends by itself), and
// one whole pass when `requested` <= 0. At least 1.
int64_t bounded_eval_batches(const data::SequentialWindowSource& valid, int64_t rows, int64_t T, int64_t requested);

class Trainer {
 public:
  static constexpr int64_t kMaxSkippedBatches = 1000;
  // With `dp`, the ranks combine each step's work as cfg asks (parallel/gradient_sync.hpp:
  // gradients summed over the ranks before the update, every rank then applying the same
  // one; or local SGD; or ZeRO); `dp` must outlive the trainer. `trace` (may be null)
  // records each step's forward, backward, gradient wait and update, and the communication
  // thread's bucket all-reduces. With `pipeline` (must outlive the trainer) this rank is
  // one stage of a pipeline (parallel/pipeline.hpp): each of a step's cfg.grad_accum
  // batches is cut into the pipeline's micro-batches, all of them run through the stages in
  // one flush of its schedule, and `dp` (if any) is the stage's data-parallel group.
  // With `experts` (must outlive the trainer) and a model holding only its block of the
  // experts, gradients are summed as parallel/expert_sync.hpp says.
  Trainer(model::Llama& model, TrainConfig cfg, parallel::DataParallel* dp = nullptr, TraceRecorder* trace = nullptr,
          parallel::PipelineStage* pipeline = nullptr, parallel::ExpertParallel* experts = nullptr);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Runs optimizer steps until cfg.steps are done (from steps_done(), which is not 0 after
  // restore_progress). `valid` may be null. Callbacks may be empty. `on_step_end` is
  // called last for each step, after any validation: where a checkpoint is taken. Then
  // `stop_after` (may be empty), when it returns true, ends the run early (a stop signal;
  // under data parallelism it must return the same on every rank).
  void run(data::BatchSource& train, data::SequentialWindowSource* valid,
           const std::function<void(const StepMetrics&)>& on_step,
           const std::function<void(const EvalMetrics&)>& on_eval,
           const std::function<void(int64_t step)>& on_step_end = {},
           const std::function<bool(int64_t step)>& stop_after = {});
  // The same with any validation: `evaluate` (may be empty) is called every
  // cfg.eval_every steps and after the last.
  void run(data::BatchSource& train, const std::function<EvalMetrics()>& evaluate,
           const std::function<void(const StepMetrics&)>& on_step,
           const std::function<void(const EvalMetrics&)>& on_eval,
           const std::function<void(int64_t step)>& on_step_end = {},
           const std::function<bool(int64_t step)>& stop_after = {});

  // One optimizer step (exposed for tests and benchmarks). A non-finite loss or gradient
  // norm throws NonFiniteStep or skips the update, by cfg.on_nonfinite. A global batch
  // without a target token has no gradient; an AdamW step on it would still move the
  // weights (momentum, decay), log a loss of 0 and spend a step of the schedule, so it is
  // skipped and the next one drawn (StepMetrics::skipped_batches); InputError after
  // kMaxSkippedBatches in a row.
  StepMetrics step(data::BatchSource& train);
  // Mean token loss over cfg.eval_batches batches from the start of `valid`, at most one
  // pass over it (all of one pass when cfg.eval_batches <= 0).
  EvalMetrics evaluate(data::SequentialWindowSource& valid);

  int64_t steps_done() const { return step_; }
  double elapsed_s() const { return elapsed_s_; }
  model::Llama& model() { return model_; }
  const TrainConfig& config() const { return cfg_; }
  const CosineSchedule& schedule() const { return schedule_; }
  // The optimizer's state (moments of the ranges this rank owns, and the step count).
  AdamW& optimizer() { return optimizer_; }
  const AdamW& optimizer() const { return optimizer_; }
  // This process's rank and the world's size (0 and 1 without data parallelism).
  int rank() const { return dp_ ? dp_->rank() : 0; }
  int world() const { return dp_ ? dp_->world() : 1; }
  // How the ranks combine their work (its name, bytes sent, whether it shards).
  const parallel::GradientSync& sync() const { return *sync_; }
  parallel::GradientSync& sync() { return *sync_; }
  // Row balancing's agreement (null without TrainConfig::balance_every).
  const parallel::RowBalancer* balancer() const { return balancer_.get(); }
  parallel::RowBalancer* balancer() { return balancer_.get(); }

  // AdamW's moments in the layout of the whole trainable arena, for reading an unsharded
  // checkpoint: the optimizer's own buffers, or under ZeRO buffers the trainer holds until
  // the next restore_progress (which keeps this rank's shard of them) or drop_whole_moments.
  std::pair<std::span<float>, std::span<float>> whole_moments();
  void drop_whole_moments();

  // Resume: the next step() is step `steps_done` + 1 and its schedule position follows;
  // elapsed time continues from `elapsed_s`. Restore the weights, whole_moments() and the
  // data source first (train/training_state.hpp does all of it): under ZeRO this rank then
  // keeps its shard of the moments.
  void restore_progress(int64_t steps_done, double elapsed_s);

  // State this rank alone holds that resuming exactly on the same world size needs:
  // under local SGD its own AdamW moments ("optimizer.m", "optimizer.v": every rank steps
  // on its own gradients) and the sync's (parallel::RankState). Empty otherwise. Spans
  // into the live buffers: a restore copies into them after restore_progress.
  std::vector<parallel::RankState> rank_state();
  // The data-parallel group (null: one process), for state kept there (the codec's).
  parallel::DataParallel* data_parallel() { return dp_; }
  // The pipeline stage this rank runs (null: none).
  parallel::PipelineStage* pipeline() { return pipeline_; }
  const parallel::PipelineStage* pipeline() const { return pipeline_; }
  // Makes the adapters whole for what reads all of them (the saved adapters): under a
  // pipeline with LoRA the stages exchange their updated layers' adapters, under expert
  // parallelism the ranks their experts'. A stage's base weights stay its own (validation
  // runs through the pipeline; the final model is written tensor by tensor from the
  // stages). Every rank calls it alike; nothing to do otherwise.
  void complete_model();

 private:
  model::Llama& model_;
  TrainConfig cfg_;
  parallel::DataParallel* dp_ = nullptr;
  TraceRecorder* trace_ = nullptr;
  parallel::PipelineStage* pipeline_ = nullptr;
  std::unique_ptr<parallel::GradientSync> sync_;  // before optimizer_: it says what this rank owns
  AdamW optimizer_;
  Buffer<float> whole_m_, whole_v_;  // ZeRO: the moments of every rank, while reading an unsharded checkpoint
  CosineSchedule schedule_;
  std::unique_ptr<parallel::RowBalancer> balancer_;  // row balancing: this step's shares
  data::Batch batch_;                       // (B, T) the current micro-batch
  data::Batch global_batch_;                // row balancing: (G, T) the step's global batch
  std::vector<data::Batch> micro_batches_;  // pipeline: the step's micro-batches
  // Forward and backward of the micro-batch in batch_, one group of deterministic_group
  // rows at a time (deterministic mode); `first_row` is its first row's index among every
  // global batch drawn so far.
  model::LossSum rows_forward_backward(int64_t first_row);
  // Row balancing: draws the step's whole global batch into global_batch_.
  void draw_global_batch(data::BatchSource& train);
  // Row balancing: copies micro-batch `micro` of this rank's share into batch_; returns its
  // first row's index in the global batch.
  int64_t take_share(int64_t micro);
  // Rows per deterministic group: the unit of the deterministic mode's batches and of row
  // balancing's shares (1 outside the deterministic mode).
  int64_t group_rows() const { return cfg_.deterministic ? cfg_.deterministic_group : 1; }
  int64_t step_ = 0;
  int64_t measured_steps_ = 0;  // row balancing: steps this process ran
  double slow_backward_ratio_ = 2.0;  // slow-rank hook: the last backward's time over its forward's
  double elapsed_s_ = 0.0;
};

}  // namespace flotilla::train
