// Tensor parallelism in the planner: what `flotilla train --parallel tp=T` costs for a
// workload (parallel/tensor_parallel.hpp and model/tensor_parallel.hpp run it).
//
// The T ranks of a tp group run the same rows, each with its slice of every split tensor
// (q, k, v and o by heads; gate, up and down by MLP columns; the embedding and lm_head by
// vocabulary rows), and add their partial activations with all-reduces. With
// A = --grad-accum, B = --batch-size rows, S tokens, width C, one activation all-reduce
// carries A B S C floats, A B S C 4 bytes a step:
//   per layer       2 forward (after o and down) and 2 backward (into d(ln1), d(ln2)):
//                   4 A B S C 4 bytes a step;
//   at the ends     the embedding (forward) and d(lnf) (backward): 2 A B S C 4 bytes, and
//                   the cross-entropy's row max and sums, 3 A B S 4 bytes;
//   on the wire     a ring all-reduce sends 2 (T-1)/T of those bytes from each rank, in
//                   2 (T-1) messages per all-reduce (the latency term), after one exchange
//                   of signatures (comm/mpi's mismatch check: one more latency);
//   the link        these are flotilla's own collectives (comm::AllReducer over the tp
//                   group: the ring between hosts, the host's arena within one), charged at
//                   the link's whole bandwidth as data parallelism's ring is (the MPI
//                   library's own reach about half of a TCP link: link.hpp;
//                   `--allreduce mpi` runs them there, the plan does not);
//   step time       one rank's data time, its compute and update divided by T (every
//                   product is split; the norms, rope and the residual adds are repeated
//                   on each rank, and T times narrower products run slower per flop: not
//                   modelled, 10% of the step at W2, tp=2), plus the all-reduces, not
//                   overlapped (each sits between two products of one block);
//   state           16 bytes a held parameter (weights, gradients, AdamW's moments): the
//                   split tensors' Ψ/T plus the replicated norms; with LoRA 4 bytes a
//                   base parameter plus 16 an adapter parameter (each B split by rows);
//                   with --dtype bf16 also 2 bytes a float of the local tensors products
//                   read (their bf16 copies: plan/workload.hpp), and the activations
//                   the rounded inputs' scratch at the local widths;
//   activations     the activation plan of the local model (heads, MLP and logits cut
//                   by T; the residual stream whole), as flotilla allocates it;
//   the final model world rank 0 gathers every rank's slices into one whole model to write
//                   it after the last step (parallel::TensorParallel::gather_full_model):
//                   4 bytes a parameter of the whole model on top of its training peak (the
//                   whole adapters' 4 bytes a parameter with LoRA).
// With sequence parallelism (--sequence-parallel) the residual stream and the norms hold
// 1/T of the rows (the activation plan of the local model with the rows sharded, the
// last slice padded: R' = ceil(A B S / T) T rows), and each all-reduce of R' C floats
// becomes an all-gather and a reduce-scatter of the same buffer ((T-1)/T of it sent
// each): the same bytes. Backward also gathers each norm's output again (it is
// recomputed from the slice): per layer 4 forward + 6 backward of these halves, where tp
// sends 8; the ends alike (embedding and lm_head input, both ways); the norms' weight
// gradients add an all-reduce of (2 L + 1) C floats a micro-batch.
//
// With --zero 3 over the D = zero_dp replicas (--parallel dp=D,tp=T --zero 3: ZeRO-3 on
// each tp rank's local model over its dp group, parallel/zero3.hpp):
//   memory          the ZeRO-3 row of plan/strategy.hpp on the local model's workload over D
//                   ranks: 16 bytes a local trainable parameter / D (with LoRA the frozen
//                   base's shard, 4 bytes a parameter / D, and the adapters whole), plus the
//                   other ranks' chunks of the groups gathered at once and, in backward, the
//                   gradients of the groups not yet reduce-scattered; the local activations;
//                   the host arena's scatter slots where the dp x tp ranks share a machine;
//   traffic         tp's collectives as above, plus ZeRO-3's of the local slices over the dp
//                   group: each gathered for forward and again for backward, the gradients
//                   reduce-scattered (the adapters all-reduced with LoRA), 3 collectives a
//                   layer, on the ring of all D x T ranks (the dp group spans their machines);
//   step time       one rank's data, compute / T and update / (T D) (each rank updates its
//                   shard of its slice), the slow-down of D x T ranks sharing cores, plus tp's
//                   and ZeRO-3's communication (not overlapped);
//   throughput      D replicas run D times tp's rows: the speed-up over one rank is D times
//                   one rank's step over this step, as data parallelism's is.
//   the final model as plain tp's: world rank 0 gathers the whole model at the end.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/plan/link.hpp"
#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {

struct TensorPlan {
  int tp = 1;
  double all_reduce_bytes_per_layer = 0.0;  // per step: 4 A B S C 4
  double all_reduce_bytes = 0.0;            // per step, every layer and the ends
  int64_t all_reduces = 0;                  // per step
  double wire_bytes_per_rank = 0.0;         // per step, one rank sends: 2 (T-1)/T x all_reduce_bytes
  double comm_s = 0.0;                      // those sends on `link`
  double step_s = 0.0;
  double speedup = 0.0;                     // one rank's step / step_s (the same rows)
  int64_t params_per_rank = 0;              // the most any rank holds (vocabulary shares differ by a row)
  int64_t split_params = 0;                 // of the whole model: Ψ - replicated
  int64_t replicated_params = 0;            // the norms, on every rank
  double state_bytes = 0.0;                 // per rank
  double activation_bytes = 0.0;            // per rank
  double memory_bytes = 0.0;                // per rank: state + activations
  double final_model_bytes = 0.0;           // world rank 0's gather of the whole model at the end
  double rank0_memory_bytes = 0.0;          // memory_bytes + final_model_bytes: the largest rank's peak
  // With --zero 1 or 2 over the dp = zero_dp replicas the other ranks make (2 or more):
  // docs/sharding.md's state per rank on a rank's local arena (t trainable floats, and a
  // LoRA base's 4 bytes a parameter): 8t + 12t/dp and 4t + 12t/dp bytes, stage 2's units in
  // flight left out. 0 when zero_dp is 1.
  int zero_dp = 1;
  double zero1_state_bytes = 0.0, zero2_state_bytes = 0.0;
  // --zero 3 over the zero_dp replicas (above); all 0 when zero_dp is 1.
  struct Zero3 {
    double weight_bytes = 0.0;      // per rank: the shard and the gathered groups in flight
    double grad_bytes = 0.0;        // per rank, in backward: the shard and the groups not yet reduced
    double optimizer_bytes = 0.0;   // per rank: AdamW's moments of the shard
    double activation_bytes = 0.0;  // per rank
    double buffer_bytes = 0.0;      // per rank: exchange scratch and the host arena's slots
    double memory_bytes = 0.0;      // per rank at the peak: the sum of the above
    double rank0_memory_bytes = 0.0;  // + final_model_bytes
    double dp_wire_bytes_per_rank = 0.0;  // per step, ZeRO-3's gathers and reduce-scatters over dp
    double dp_comm_s = 0.0;
    double step_s = 0.0;
    double speedup = 0.0;  // zero_dp x one rank's step / step_s: the replicas' throughput
  } zero3;
  // The same with --sequence-parallel.
  struct Sequence {
    double wire_bytes_per_rank = 0.0;  // per step, one rank sends
    double comm_s = 0.0;
    double step_s = 0.0;
    double activation_bytes = 0.0;  // per rank
    double memory_bytes = 0.0;      // per rank
    double rank0_memory_bytes = 0.0;  // + final_model_bytes
  } sequence;
};

// The dp x tp mesh the ZeRO figures are planned on: dp replicas of each tp slice, the ring
// over all dp x tp ranks (the dp group spans their machines), how much slower those ranks
// compute than one alone, and how they sit on the machines (the host arena ZeRO-3 uses).
struct ReplicaMesh {
  int dp = 1;
  Link link;
  double slow = 1.0;
  int ranks_per_host = 1, hosts = 1;
};

// The plan for tp ranks on `link`, and with ZeRO over `dp` replicas of them; InputError
// when tp does not split the model (model::tensor_parallel_config). `slow`: how much
// slower each rank computes than one alone (compute_slowdown: ranks sharing cores).
// Without a ReplicaMesh the replicas' ZeRO-3 runs on `link` at `slow`, one rank a machine.
TensorPlan plan_tensor_parallel(const Workload& w, const StepCost& one_rank, int tp, const Link& link, int dp = 1,
                                double slow = 1.0);
TensorPlan plan_tensor_parallel(const Workload& w, const StepCost& one_rank, int tp, const Link& link,
                                const ReplicaMesh& replicas, double slow);
// tp = 2, 4, ... up to the cluster's ranks, each that splits the model (none for a mixture
// of experts); the ZeRO figures over the replicas of all the ranks.
template <class SlowFor>
std::vector<TensorPlan> tensor_parallel_plans(const Workload& w, const StepCost& one_rank, const Cluster& cluster,
                                              SlowFor&& slow_for);
// The same on one link for any number of ranks (tests).
template <class LinkFor, class SlowFor>
std::vector<TensorPlan> tensor_parallel_plans(const Workload& w, const StepCost& one_rank, int max_ranks,
                                              LinkFor&& link_for, SlowFor&& slow_for);
bool tensor_parallel_splits(const Workload& w, int tp);

nlohmann::json tensor_json(const TensorPlan& p);

template <class LinkFor, class SlowFor>
std::vector<TensorPlan> tensor_parallel_plans(const Workload& w, const StepCost& one_rank, int max_ranks,
                                              LinkFor&& link_for, SlowFor&& slow_for) {
  std::vector<TensorPlan> plans;
  for (int tp = 2; tp <= max_ranks; tp *= 2)
    if (tensor_parallel_splits(w, tp))
      plans.push_back(plan_tensor_parallel(w, one_rank, tp, link_for(tp), max_ranks / tp, slow_for(tp)));
  return plans;
}

template <class SlowFor>
std::vector<TensorPlan> tensor_parallel_plans(const Workload& w, const StepCost& one_rank, const Cluster& cluster,
                                              SlowFor&& slow_for) {
  const int N = std::max(1, cluster.max_ranks());
  std::vector<TensorPlan> plans;
  for (int tp = 2; tp <= N; tp *= 2) {
    if (!tensor_parallel_splits(w, tp)) continue;
    const int all = N / tp * tp;
    const ReplicaMesh replicas{N / tp, cluster.link_for(all), slow_for(all), cluster.ranks_per_host(all),
                               cluster.hosts_used(all)};
    plans.push_back(plan_tensor_parallel(w, one_rank, tp, cluster.link_for(tp), replicas, slow_for(tp)));
  }
  return plans;
}

}  // namespace flotilla::plan
