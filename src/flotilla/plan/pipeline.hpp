// Pipeline parallelism in the planner: what `flotilla train --parallel pp=P
// --micro-batches M` costs for a workload (parallel/pipeline.hpp runs it).
//
// With A = --grad-accum, B = --batch-size rows, T tokens, width C, a step runs M' = A M
// micro-batches of B/M rows through P stages in one flush:
//   bubble          each stage idles (P-1)/(M'+P-1) of the flush when the stages cost alike
//                   (GPipe and 1F1B alike);
//   point to point  each of the P-1 stage boundaries carries the step's activations
//                   forward and their gradients back: 2 A B T C floats, 8 A B T C bytes;
//                   a middle stage sends both directions' halves of it, 8 A B T C bytes,
//                   in 2 M' messages (LoRA whose adapters all sit above a boundary sends no
//                   gradient across it; not modelled: counted as sent);
//   step time       the slowest stage's share of one rank's compute (stages as balanced
//                   by parallel::balance_stages), stretched by the bubble, plus its sends
//                   (not overlapped: a conservative bound), the data and its own share of
//                   the optimizer update. Micro-batches of fewer rows run their products
//                   slower per row; that is not modelled;
//   activations     a slot per micro-batch in flight: 1F1B min(P-s, M') on stage s, GPipe
//                   M'; each slot is what the stage writes of a micro-batch's activation
//                   plan of B/M rows (Llama::stage_activation_bytes): its own layers'
//                   views, the head's on the last stage only, and the shared scratch
//                   (flotilla allocates the whole plan per slot, but the other stages'
//                   layers' pages are never written, so never resident);
//   state           a stage's own tensors only: 16 bytes a parameter (weights, gradients,
//                   AdamW's moments), so P stages hold about 1/P of the model each;
//                   with --dtype bf16 their bf16 copies, 2 bytes a float of the model's
//                   dense share (Workload::bf16_copy_floats / model_floats) of the stage's;
//   the final model stage 0 writes it tensor by tensor after the last step, receiving each
//                   tensor another stage owns into its place and handing it back once
//                   written (parallel/pipeline_sync.cpp): the largest such tensor on top of
//                   stage 0's peak (full fine-tuning; LoRA's adapters are on every stage).
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/parallel/pipeline.hpp"
#include "flotilla/plan/link.hpp"
#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {

struct PipelinePlan {
  int stages = 1;
  int64_t micro_batches = 1;  // train's --micro-batches: per --batch-size batch
  parallel::PipelineSchedule schedule = parallel::PipelineSchedule::one_f_one_b;
  std::vector<parallel::StageRange> ranges;
  double bubble = 0.0;               // (P-1)/(M'+P-1)
  double boundary_bytes = 0.0;       // per step, across one boundary, both directions
  double p2p_bytes = 0.0;            // per step, all boundaries: (P-1) x boundary_bytes
  double max_rank_send_bytes = 0.0;  // per step, the most one rank sends
  double comm_s = 0.0;               // that rank's sends on `link`
  double slowest_stage_share = 0.0;  // of one rank's compute: the costliest stage's
  double step_s = 0.0;
  double speedup = 0.0;              // one rank's step / step_s
  std::vector<int64_t> slots;        // per stage: micro-batches in flight at most
  std::vector<double> activation_bytes;  // per stage
  // Per stage: the float32 weights, gradients and AdamW moments of its own tensors (16
  // bytes a parameter: each stage holds only its layers, the embedding on the first and,
  // tied, the last, the head on the last); with LoRA its base weights (4 bytes) and the
  // adapters' 16 bytes a parameter (every stage holds all adapters).
  std::vector<double> state_bytes;
  std::vector<double> memory_bytes;  // per stage: state_bytes + activation_bytes
  double final_write_bytes = 0.0;    // stage 0, writing the final model: the largest tensor it receives
  std::vector<double> peak_bytes;    // per stage: memory_bytes, stage 0's + final_write_bytes
  // Full fine-tuning with --zero 1 over the dp = zero_dp replicas the other ranks make (2
  // or more): per stage 8f + 12f/dp bytes for its f floats (docs/sharding.md's table on the
  // stage's own tensors). Empty when zero_dp is 1 or with LoRA.
  int zero_dp = 1;
  std::vector<double> zero1_state_bytes;
};

// InputError (from parallel/) when P exceeds the layers or M does not divide the batch.
// `dp`: the replicas of the pipeline the ranks make (ZeRO-1's figures when 2 or more).
// `slow`: how much slower each rank computes than one alone (compute_slowdown).
PipelinePlan plan_pipeline(const Workload& w, const StepCost& one_rank, int stages, int64_t micro_batches,
                           parallel::PipelineSchedule schedule, const Link& link, int dp = 1, double slow = 1.0);

nlohmann::json pipeline_json(const PipelinePlan& p);

}  // namespace flotilla::plan
