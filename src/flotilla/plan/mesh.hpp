// Pipeline stages of tensor-parallel groups in the planner: what `flotilla train
// --parallel pp=P,tp=T --micro-batches M` costs per rank, composed from the two plans
// (plan/pipeline.hpp, plan/tensor.hpp) as flotilla runs them (train/job.cpp):
//   a rank          holds its tp rank's slice of its stage's tensors: the pipeline plan of
//                   the tp rank's local model (model::tensor_parallel_config, tp rank 0's,
//                   which holds the most vocabulary rows), whose state and activation
//                   slots per stage are then per rank;
//   point to point  each tp rank of a stage sends the whole activations (B, T, C) to the
//                   same tp rank of the next stage: the pipeline's bytes, T times over
//                   across each boundary, the same per rank;
//   all-reduces     a stage's tp group all-reduces 4 A B S C 4 bytes a step per layer it
//                   runs, stage 0 also the embedding's A B S C 4, the last stage d(lnf)'s
//                   and the cross-entropy's 3 A B S 4; a ring sends 2 (T-1)/T of them;
//   step time       the pipeline's step on the local model with one rank's compute and
//                   update divided by T, plus the busiest stage's all-reduces (not overlapped).
#pragma once

#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/plan/pipeline.hpp"
#include "flotilla/plan/tensor.hpp"

namespace flotilla::plan {

struct MeshPlan {
  int pp = 1, tp = 1;
  PipelinePlan stages;  // per rank: the tp rank's local model's pipeline
  std::vector<double> tp_all_reduce_bytes;  // per stage, per step
  std::vector<double> tp_wire_bytes;        // per stage, per step: what one rank sends over tp
  double tp_comm_s = 0.0;                   // the busiest stage's, on the tp link
  double step_s = 0.0;
  double speedup = 0.0;  // one rank's step / step_s
};

// InputError when tp does not split the model, or pp x M does not fit it (as each alone).
MeshPlan plan_mesh(const Workload& w, const StepCost& one_rank, int pp, int tp, int64_t micro_batches,
                   const Link& pp_link, const Link& tp_link);

nlohmann::json mesh_json(const MeshPlan& p);

}  // namespace flotilla::plan
