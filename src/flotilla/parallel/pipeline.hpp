// Pipeline parallelism, as GPipe and 1F1B (PipeDream-Flush; Megatron's and picotron's
// default) run it. The vocabulary of this file and pipeline.cpp:
//   stage s        the ranks of pp index s in the mesh; they run the contiguous layers
//                  [begin_s, end_s). Stage 0 also embeds the tokens; stage P-1 also runs
//                  the head (final norm, lm_head) and the loss.
//   micro-batch    one of the M row slices of a step's batch that flow through the stages.
//   action         one forward F(i) or one backward B(i) of micro-batch i on one stage.
//   schedule       a stage's actions, in order (gpipe_schedule, one_f_one_b_schedule).
//   slot           the activations of one micro-batch in flight on a stage (its forward
//                  done, its backward not yet): a model::Llama::ForwardSlot.
// Between neighbouring stages travel, point to point over the pp group: F(i)'s output
// (B, T, C) to the next stage, B(i)'s input gradient (B, T, C) to the previous one.
//
// Both schedules keep every stage idle (P-1) of (M+P-1) action times of a step when the
// stages cost alike (the bubble). They differ in memory: GPipe holds all M micro-batches'
// activations at once; 1F1B at most P-s on stage s.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/trace.hpp"
#include "flotilla/comm/communicator.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::parallel {

enum class PipelineSchedule : uint8_t { gpipe, one_f_one_b };
// "gpipe", "1f1b"; InputError naming --pp-schedule for anything else.
PipelineSchedule parse_pipeline_schedule(std::string_view name);
std::string_view pipeline_schedule_name(PipelineSchedule schedule);

// What the user asks of the pipeline (`flotilla train --micro-batches --pp-schedule
// --pp-layers`).
struct PipelineConfig {
  int64_t micro_batches = 1;  // M: the batch's rows are cut into M micro-batches
  PipelineSchedule schedule = PipelineSchedule::one_f_one_b;
  std::vector<int64_t> stage_layers;  // layers per stage, from the first; empty: balanced
};

// `--pp-layers a,b,...`: positive whole numbers. InputError naming the flag otherwise.
std::vector<int64_t> parse_pp_layers(std::string_view spec);

// One stage's layers [begin, end).
using StageRange = model::Llama::LayerRange;

// A forward's multiply-adds per token of one decoder block, and of the head (lm_head):
// the cost the stages are balanced by. The embedding (a lookup) costs nothing here.
double block_cost(const model::ModelConfig& cfg, int64_t seq_len);
double head_cost(const model::ModelConfig& cfg);

// Contiguous stages of `stages` (at least one layer each) whose largest cost (block_cost
// per layer, head_cost on the last) is the least possible. InputError when there are more
// stages than layers.
std::vector<StageRange> balance_stages(const model::ModelConfig& cfg, int stages, int64_t seq_len);
// The stages `layers_per_stage` gives: InputError naming --pp-layers unless it has one
// positive count per stage and they add up to the model's layers.
std::vector<StageRange> stages_from_counts(const model::ModelConfig& cfg, int stages,
                                           std::span<const int64_t> layers_per_stage);

struct PipelineAction {
  enum class Kind : uint8_t { forward, backward };
  Kind kind = Kind::forward;
  int64_t micro = 0;
  bool operator==(const PipelineAction&) const = default;
};

// GPipe: F(0) ... F(M-1), then B(0) ... B(M-1).
std::vector<PipelineAction> gpipe_schedule(int stages, int stage, int64_t micro_batches);
// 1F1B: a warm-up of min(P-1-s, M) forwards; then, while forwards remain, one forward and
// one backward (the oldest micro-batch in flight); then the cool-down's backwards.
std::vector<PipelineAction> one_f_one_b_schedule(int stages, int stage, int64_t micro_batches);
std::vector<PipelineAction> stage_schedule(PipelineSchedule schedule, int stages, int stage, int64_t micro_batches);

// The most micro-batches a schedule holds in flight (forward done, backward not yet).
int64_t max_in_flight(std::span<const PipelineAction> actions);

// This rank's stage of the pipeline: runs its schedule on its model, one flush per step.
class PipelineStage {
 public:
  // `pp` (the mesh's pp group; must outlive the stage) orders the stages: its rank is the
  // stage index. `ranges` has one entry per stage.
  PipelineStage(comm::Communicator& pp, std::vector<StageRange> ranges, const PipelineConfig& config);

  int stages() const { return static_cast<int>(ranges_.size()); }
  int stage() const { return pp_.rank(); }
  bool first() const { return stage() == 0; }
  bool last() const { return stage() + 1 == stages(); }
  const std::vector<StageRange>& ranges() const { return ranges_; }
  StageRange range() const { return ranges_[static_cast<size_t>(stage())]; }
  const PipelineConfig& config() const { return config_; }
  comm::Communicator& communicator() { return pp_; }

  // Cuts `batch` (B rows) into config().micro_batches micro-batches of B / M rows, in order.
  // InputError when M does not divide B.
  void split(const data::Batch& batch, std::vector<data::Batch>& micro) const;

  // One flush: every action of this stage's schedule over `micro`, on `model` (whose layer
  // range is this stage's). Gradients are added into the model's, as sums of per-token
  // gradients (backward(1)). Returns the loss summed over `micro` (only the last stage has
  // one; the others return zero). `trace` (may be null) gets a span per action and per wait.
  model::LossSum run(model::Llama& model, std::span<const data::Batch> micro, TraceRecorder* trace);

  // A forward of `batch` through the stages, for evaluation: no backward, no gradient.
  // Cut into the micro-batches (when M divides its rows; else whole), which run one after
  // the other in one slot. Returns the loss of the batch, summed over the pp group: every
  // stage returns it. Every stage calls it alike.
  model::LossSum forward_only(model::Llama& model, const data::Batch& batch);

  // The most micro-batches' activations this stage has held at once (its slots).
  int64_t peak_slots() const { return static_cast<int64_t>(slots_.size()); }
  // What this stage has sent its neighbours in the flushes (run) so far: activations and
  // their gradients, point to point (evaluation's forwards are not counted).
  uint64_t bytes_sent() const { return bytes_sent_; }
  // A mixture of experts: the last flush's load-balancing loss (weighted by each micro-batch's
  // target tokens) and share of assignments dropped over capacity, on every stage.
  double router_aux_loss() const { return router_aux_loss_; }
  double expert_dropped() const { return expert_dropped_; }

 private:
  size_t acquire_slot();

  comm::Communicator& pp_;
  std::vector<StageRange> ranges_;
  PipelineConfig config_;
  std::vector<model::Llama::ForwardSlot> slots_;
  std::vector<size_t> free_slots_;
  uint64_t bytes_sent_ = 0;
  double router_aux_loss_ = 0.0, expert_dropped_ = 0.0;
};

}  // namespace flotilla::parallel
