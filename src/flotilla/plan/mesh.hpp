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
//                   and the cross-entropy's 3 A B S 4; a ring sends 2 (T-1)/T of them, as
//                   flotilla's own collectives (the tp link's whole bandwidth, as dp's ring;
//                   one latency a ring step and one for the mismatch check: plan/tensor.hpp);
//   step time       the pipeline's step on the local model with one rank's compute and
//                   update divided by T, plus the busiest stage's all-reduces (not overlapped);
//   the final model the stages first broadcast their tensors over the pp group, so every
//                   rank's arena then holds its tp slice of every layer (4 bytes a local
//                   parameter of the other stages' tensors join its peak), then world rank 0
//                   gathers the whole model from its tp group (4 bytes a parameter more);
//                   with LoRA only the whole adapters (train/job.cpp, write_outputs);
//   --sequence-parallel  a stage hands the next only its tp rank's rows (the point-to-point
//                   bytes / T, rows padded to T); each all-reduce of a micro-batch's rows
//                   becomes an all-gather and a reduce-scatter of halves (plan/tensor.hpp):
//                   10 a layer, 2 more on the first stage (the embedding) and on the last
//                   (lm_head's input), and all-reduces of the norms' weight gradients (one a
//                   layer, lnf's) and of the loss's 3 floats a row on the last stage; the
//                   activation slots of the local model with its rows sharded over T.
#pragma once

#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/plan/pipeline.hpp"
#include "flotilla/plan/tensor.hpp"

namespace flotilla::plan {

struct MeshPlan {
  int pp = 1, tp = 1;
  PipelinePlan stages;  // per rank: the tp rank's local model's pipeline (its peak_bytes: the mesh's)
  std::vector<double> tp_all_reduce_bytes;  // per stage, per step
  std::vector<double> tp_wire_bytes;        // per stage, per step: what one rank sends over tp
  double tp_comm_s = 0.0;                   // the busiest stage's, on the tp link
  double step_s = 0.0;
  double speedup = 0.0;  // one rank's step / step_s
  double final_model_bytes = 0.0;  // world rank 0's gather of the whole model (or adapters) at the end
  std::vector<double> peak_bytes;  // per stage: memory_bytes + the end's (stage 0: world rank 0's)
  struct Sequence {
    double max_rank_send_bytes = 0.0;  // per step, point to point: the pipeline's / T
    std::vector<double> tp_wire_bytes;  // per stage, per step
    double tp_comm_s = 0.0;             // the busiest stage's
    double step_s = 0.0;
    double speedup = 0.0;
    std::vector<double> activation_bytes;  // per stage
    std::vector<double> memory_bytes;      // per stage: state + activations
    std::vector<double> peak_bytes;        // per stage, with the end's
  } sequence;
};

// InputError when tp does not split the model, or pp x M does not fit it (as each alone).
// `slow`: how much slower each rank computes than one alone (compute_slowdown).
MeshPlan plan_mesh(const Workload& w, const StepCost& one_rank, int pp, int tp, int64_t micro_batches,
                   const Link& pp_link, const Link& tp_link, double slow = 1.0);

nlohmann::json mesh_json(const MeshPlan& p);

}  // namespace flotilla::plan
