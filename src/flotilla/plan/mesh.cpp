#include "flotilla/plan/mesh.hpp"

#include <algorithm>

#include "flotilla/model/tensor_parallel.hpp"

namespace flotilla::plan {

MeshPlan plan_mesh(const Workload& w, const StepCost& one_rank, int pp, int tp, int64_t micro_batches,
                   const Link& pp_link, const Link& tp_link) {
  MeshPlan p;
  p.pp = pp;
  p.tp = tp;
  const Workload local = describe_workload(model::tensor_parallel_config(w.model, {0, tp}), w.lora, w.lora_config,
                                           w.batch_size, w.seq_len, w.grad_accum, w.grad_checkpoint);
  const double T = tp;
  StepCost sliced = one_rank;
  sliced.compute_s /= T;
  sliced.update_s /= T;
  p.stages = plan_pipeline(local, sliced, pp, micro_batches, parallel::PipelineSchedule::one_f_one_b, pp_link);
  const double rows = static_cast<double>(w.grad_accum * w.batch_size * w.seq_len);  // A B S
  const double activation = rows * static_cast<double>(w.model.dim) * 4.0;
  for (size_t s = 0; s < p.stages.ranges.size(); ++s) {
    const parallel::StageRange r = p.stages.ranges[s];
    double bytes = 4.0 * activation * static_cast<double>(r.end - r.begin);
    int64_t all_reduces = w.grad_accum * 4 * (r.end - r.begin);
    if (s == 0) {
      bytes += activation;  // the embedding
      all_reduces += w.grad_accum;
    }
    if (s + 1 == p.stages.ranges.size()) {
      bytes += activation + 3.0 * rows * 4.0;  // d(lnf), the cross-entropy's max and sums
      all_reduces += 3 * w.grad_accum;
    }
    p.tp_all_reduce_bytes.push_back(bytes);
    p.tp_wire_bytes.push_back(2.0 * (T - 1.0) / T * bytes);
    p.tp_comm_s = std::max(p.tp_comm_s, p.tp_wire_bytes.back() / tp_link.bandwidth_bytes_per_s +
                                            static_cast<double>(all_reduces) * 2.0 * (T - 1.0) * tp_link.latency_s);
  }
  p.step_s = p.stages.step_s + p.tp_comm_s;
  p.speedup = p.step_s > 0.0 ? one_rank.total_s() / p.step_s : 0.0;
  return p;
}

nlohmann::json mesh_json(const MeshPlan& p) {
  return {{"pp", p.pp},
          {"tp", p.tp},
          {"pipeline", pipeline_json(p.stages)},
          {"tp_all_reduce_bytes_per_step", p.tp_all_reduce_bytes},
          {"tp_wire_bytes_per_rank_per_step", p.tp_wire_bytes},
          {"tp_comm_s", p.tp_comm_s},
          {"step_s", p.step_s},
          {"speedup", p.speedup}};
}

}  // namespace flotilla::plan
