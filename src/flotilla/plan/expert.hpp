// Expert parallelism in the planner: what `flotilla train --parallel ep=E` costs for a
// mixture-of-experts workload (parallel/expert_parallel.hpp and expert_sync.hpp run it).
//
// With A = --grad-accum, B = --batch-size rows, T tokens, width C, K experts per token, a
// rank routes R = A B T K rows of C floats per MoE layer and step. Routing is taken as
// balanced (the load-balancing loss's aim): a row goes to each of the ep ranks alike, so
// (ep-1)/ep of the rows leave the rank. Per MoE layer and step, one rank sends
//   dispatch   forward, the rows to their experts' ranks:       R C 4 (ep-1)/ep bytes
//   combine    forward, the expert outputs back:                R C 4 (ep-1)/ep
//   backward   d(expert output) to the experts, d(rows) back:   2 R C 4 (ep-1)/ep
// so all_to_all_bytes = 4 R C 4 (ep-1)/ep, and before each forward's dispatch the counts,
// E int64 per micro-batch: A E 8 (ep-1)/ep bytes. (Skewed routing sends more from the
// ranks whose tokens prefer other ranks' experts; not modelled.)
// Gradients (expert_sync.hpp): the shared tensors (all but the experts, or all but the
// experts' adapters) are all-reduced over the ep ranks, 2 (ep-1)/ep x 4 bytes a float sent;
// a block's experts over its dp replicas, which these plans (ep = the world) do not have.
// Memory: each rank holds E/ep of every MoE layer's experts: full training 20 bytes a
// parameter (weights, gradients, AdamW's moments, and the gradient copied into the
// optimizer's owned gradients: expert_sync.hpp), LoRA 4 (the frozen base's weights) plus
// every expert's adapters with their gradients (8 bytes a float) and, for its own block's,
// the moments and the owned copy (12 more); one rank holds 16 bytes an adapter float.
// Everything else (attention, router, embeddings) whole on every rank, as one rank holds it.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {

struct ExpertPlan {
  int ep = 1;
  int64_t moe_layers = 0;
  int64_t expert_params = 0;            // all experts of every MoE layer
  double all_to_all_bytes_per_layer = 0.0;  // per step, one rank sends (dispatch + combine, forward and backward)
  double count_bytes_per_layer = 0.0;   // per step, one rank sends: the rows' counts
  double all_to_all_bytes = 0.0;        // per step, every MoE layer, rows and counts
  double gradient_bytes = 0.0;          // per step, one rank sends: the shared tensors' all-reduce
  double expert_bytes_per_rank = 0.0;   // its E/ep experts' state (and all experts' adapters)
  double expert_bytes_one_rank = 0.0;   // every expert's state on one rank (16 bytes or 4 + adapters with LoRA)
};

// The plans for ep = 2, 4, ... up to `max_ranks`, each dividing the experts; none for a
// dense model.
std::vector<ExpertPlan> expert_parallel_plans(const Workload& w, int max_ranks);
ExpertPlan plan_expert_parallel(const Workload& w, int ep);

nlohmann::json expert_json(const ExpertPlan& p);

}  // namespace flotilla::plan
