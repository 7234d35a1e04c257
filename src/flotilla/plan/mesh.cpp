#include "flotilla/plan/mesh.hpp"

#include <algorithm>
#include <cmath>
#include <optional>

#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/tensor_parallel.hpp"

namespace flotilla::plan {

MeshPlan plan_mesh(const Workload& w, const StepCost& one_rank, int pp, int tp, int64_t micro_batches,
                   const Link& pp_link, const Link& tp_link, double slow) {
  MeshPlan p;
  p.pp = pp;
  p.tp = tp;
  const model::ModelConfig local_cfg = model::tensor_parallel_config(w.model, {0, tp});
  Workload local = describe_workload(local_cfg, w.lora, w.lora_config, w.batch_size, w.seq_len, w.grad_accum,
                                     w.grad_checkpoint);
  local.dtype = w.dtype;
  const double T = tp;
  StepCost sliced = one_rank;
  sliced.compute_s /= T;
  sliced.update_s /= T;
  p.stages = plan_pipeline(local, sliced, pp, micro_batches, parallel::PipelineSchedule::one_f_one_b, pp_link, 1, slow);
  const size_t S = p.stages.ranges.size();
  const double rows = static_cast<double>(w.grad_accum * w.batch_size * w.seq_len);  // A B S
  const double C = static_cast<double>(w.model.dim);
  const double activation = rows * C * 4.0;
  for (size_t s = 0; s < S; ++s) {
    const parallel::StageRange r = p.stages.ranges[s];
    double bytes = 4.0 * activation * static_cast<double>(r.end - r.begin);
    int64_t all_reduces = w.grad_accum * 4 * (r.end - r.begin);
    if (s == 0) {
      bytes += activation;  // the embedding
      all_reduces += w.grad_accum;
    }
    if (s + 1 == S) {
      bytes += activation + 3.0 * rows * 4.0;  // d(lnf), the cross-entropy's max and sums
      all_reduces += 3 * w.grad_accum;
    }
    p.tp_all_reduce_bytes.push_back(bytes);
    p.tp_wire_bytes.push_back(2.0 * (T - 1.0) / T * bytes);
    p.tp_comm_s = std::max(p.tp_comm_s, ring_collectives_s(p.tp_wire_bytes.back(), static_cast<double>(all_reduces),
                                                              2.0 * (T - 1.0), tp_link));
  }
  p.step_s = p.stages.step_s + p.tp_comm_s;
  p.speedup = p.step_s > 0.0 ? one_rank.total_s() / p.step_s : 0.0;

  // The end (mesh.hpp): every rank's slices of the other stages' tensors, and rank 0's whole model.
  std::vector<double> end_bytes(S, 0.0);
  if (w.lora) {
    p.final_model_bytes = 4.0 * static_cast<double>(model::LoraAdapters(w.model, w.lora_config).params().size());
  } else {
    p.final_model_bytes = 4.0 * static_cast<double>(w.model.num_params());
    const double held = 4.0 * static_cast<double>(local_cfg.num_params());
    for (size_t s = 0; s < S; ++s) end_bytes[s] = std::max(0.0, held - p.stages.state_bytes[s] / 4.0);
  }
  end_bytes[0] += p.final_model_bytes;
  for (size_t s = 0; s < S; ++s) p.peak_bytes.push_back(p.stages.memory_bytes[s] + end_bytes[s]);
  p.stages.final_write_bytes = 0.0;  // rank 0 writes the gathered model, receiving nothing tensor by tensor
  p.stages.peak_bytes = p.peak_bytes;

  // --sequence-parallel (mesh.hpp).
  MeshPlan::Sequence& q = p.sequence;
  const auto micro_rows = static_cast<double>(w.batch_size / micro_batches * w.seq_len);
  const double padded_rows = std::ceil(micro_rows / T) * T;
  const double half = padded_rows * C * 4.0;
  const double flush = static_cast<double>(w.grad_accum * micro_batches);  // M'
  const double p2p_saved = p.stages.max_rank_send_bytes * (1.0 - padded_rows / T / micro_rows);
  q.max_rank_send_bytes = p.stages.max_rank_send_bytes - p2p_saved;
  std::optional<model::LoraAdapters> adapters;
  if (w.lora) adapters.emplace(local_cfg, w.lora_config);
  for (size_t s = 0; s < S; ++s) {
    const parallel::StageRange r = p.stages.ranges[s];
    const auto layers = static_cast<double>(r.end - r.begin);
    const bool first = s == 0, last = s + 1 == S;
    const double halves = 10.0 * layers + (first ? 2.0 : 0.0) + (last ? 2.0 : 0.0);
    const double reduced_floats = (2.0 * layers + (last ? 1.0 : 0.0)) * C + (last ? 3.0 * micro_rows : 0.0);
    const double all_reduces = layers + (last ? 3.0 : 0.0);
    const double halves_wire = flush * (T - 1.0) / T * halves * half;
    const double reduced_wire = flush * 2.0 * (T - 1.0) / T * reduced_floats * 4.0;
    q.tp_wire_bytes.push_back(halves_wire + reduced_wire);
    q.tp_comm_s = std::max(q.tp_comm_s, ring_collectives_s(halves_wire, flush * halves, T - 1.0, tp_link) +
                                            ring_collectives_s(reduced_wire, flush * all_reduces, 2.0 * (T - 1.0),
                                                                  tp_link));
    const double slot = static_cast<double>(model::Llama::stage_activation_bytes(
        local_cfg, adapters ? &*adapters : nullptr, w.batch_size / micro_batches, w.seq_len, w.grad_checkpoint,
        {r.begin, r.end}, tp));
    q.activation_bytes.push_back(static_cast<double>(p.stages.slots[s]) * slot);
    q.memory_bytes.push_back(p.stages.state_bytes[s] + q.activation_bytes.back());
    q.peak_bytes.push_back(q.memory_bytes.back() + end_bytes[s]);
  }
  q.step_s = p.stages.step_s - p2p_saved / pp_link.bandwidth_bytes_per_s + q.tp_comm_s;
  q.speedup = q.step_s > 0.0 ? one_rank.total_s() / q.step_s : 0.0;
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
          {"speedup", p.speedup},
          {"final_model_bytes_rank0", p.final_model_bytes},
          {"peak_bytes", p.peak_bytes},
          {"sequence_parallel",
           {{"max_rank_send_bytes_per_step", p.sequence.max_rank_send_bytes},
            {"tp_wire_bytes_per_rank_per_step", p.sequence.tp_wire_bytes},
            {"tp_comm_s", p.sequence.tp_comm_s},
            {"step_s", p.sequence.step_s},
            {"speedup", p.sequence.speedup},
            {"activation_bytes", p.sequence.activation_bytes},
            {"memory_bytes", p.sequence.memory_bytes},
            {"peak_bytes", p.sequence.peak_bytes}}}};
}

}  // namespace flotilla::plan
