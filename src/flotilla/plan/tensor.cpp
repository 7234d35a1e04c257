#include "flotilla/plan/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <optional>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/plan/strategy.hpp"

namespace flotilla::plan {

bool tensor_parallel_splits(const Workload& w, int tp) {
  try {
    (void)model::tensor_parallel_config(w.model, {0, tp});
    return true;
  } catch (const InputError&) {
    return false;
  }
}

TensorPlan plan_tensor_parallel(const Workload& w, const StepCost& one_rank, int tp, const Link& link, int dp,
                                double slow) {
  return plan_tensor_parallel(w, one_rank, tp, link, ReplicaMesh{dp, link, slow, 1, 1}, slow);
}

TensorPlan plan_tensor_parallel(const Workload& w, const StepCost& one_rank, int tp, const Link& link,
                                const ReplicaMesh& replicas, double slow) {
  const int dp = replicas.dp;
  const model::ModelConfig& cfg = w.model;
  TensorPlan p;
  p.tp = tp;
  const double rows = static_cast<double>(w.grad_accum * w.batch_size * w.seq_len);  // A B S
  const double activation = rows * static_cast<double>(cfg.dim) * 4.0;               // one all-reduce's bytes
  p.all_reduce_bytes_per_layer = 4.0 * activation;
  p.all_reduce_bytes = static_cast<double>(cfg.n_layers) * p.all_reduce_bytes_per_layer + 2.0 * activation +
                       3.0 * rows * 4.0;
  p.all_reduces = w.grad_accum * (4 * cfg.n_layers + 4);  // + embedding, d(lnf), the loss's max and sums
  // A mixture of experts' layer (its experts split as dense MLPs) all-reduces as a dense
  // layer does, plus in backward its combine weights' gradient (K floats a row) and, with
  // a shared expert, its gate's (one a row): small, but a latency each.
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < cfg.n_layers; ++l) moe_layers += cfg.moe_layer(l) ? 1 : 0;
  if (moe_layers > 0) {
    const int64_t per_layer = cfg.moe.shared_expert_ffn_dim > 0 ? 2 : 1;
    p.all_reduce_bytes += static_cast<double>(moe_layers) * rows * 4.0 *
                          static_cast<double>(cfg.moe.top_k + (per_layer == 2 ? 1 : 0));
    p.all_reduces += w.grad_accum * per_layer * moe_layers;
  }
  const double T = tp;
  p.wire_bytes_per_rank = 2.0 * (T - 1.0) / T * p.all_reduce_bytes;
  p.comm_s = ring_collectives_s(p.wire_bytes_per_rank, static_cast<double>(p.all_reduces), 2.0 * (T - 1.0), link);
  const double work_s = (one_rank.data_s + (one_rank.compute_s + one_rank.update_s) / T) * slow;
  p.step_s = work_s + p.comm_s;
  p.speedup = p.step_s > 0.0 ? one_rank.total_s() / p.step_s : 0.0;
  // Held parameters: every rank's local model; the largest (vocabulary shares differ).
  for (int r = 0; r < tp; ++r)
    p.params_per_rank = std::max(p.params_per_rank, model::tensor_parallel_config(cfg, {r, tp}).num_params());
  p.replicated_params = (2 * cfg.n_layers + 1) * cfg.dim;  // ln1, ln2 per layer, the final norm
  // and a mixture's routers (E x C a layer) and shared experts' gates (C), which every tp
  // rank holds whole so that all route alike; its experts are split as dense MLPs.
  p.replicated_params += moe_layers * (cfg.moe.num_experts + (cfg.moe.shared_expert_ffn_dim > 0 ? 1 : 0)) * cfg.dim;
  p.split_params = cfg.num_params() - p.replicated_params;
  const model::ModelConfig local = model::tensor_parallel_config(cfg, {tp - 1, tp});
  std::optional<model::LoraAdapters> adapters;
  if (w.lora) adapters.emplace(local, w.lora_config);
  // A LoRA rank's frozen base: 4 bytes a parameter, or a quantized base's slices as they
  // are stored (packed words, scales and biases: the largest rank's).
  double frozen_base_bytes = 4.0 * static_cast<double>(p.params_per_rank);
  if (cfg.quantization) {
    int64_t words = 0;
    for (int r = 0; r < tp; ++r) words = std::max(words, model_words(model::tensor_parallel_config(cfg, {r, tp})));
    frozen_base_bytes = 4.0 * static_cast<double>(words);
  }
  p.state_bytes = w.lora ? frozen_base_bytes + 16.0 * static_cast<double>(adapters->params().size())
                         : 16.0 * static_cast<double>(p.params_per_rank);
  // --dtype bf16: the local model's copies (tensor.hpp).
  if (w.dtype == kernels::GemmInput::bf16) {
    double most = 0.0;
    for (int r = 0; r < tp; ++r)
      most = std::max(most, static_cast<double>(bf16_copy_floats(model::tensor_parallel_config(cfg, {r, tp}))));
    p.state_bytes += 2.0 * most;
  }
  Workload local_shape = w;
  local_shape.model = local;
  const double bf16_scratch = local_shape.bf16_scratch_bytes();  // the local widths
  p.activation_bytes = static_cast<double>(model::Llama::activation_bytes(
      local, adapters ? &*adapters : nullptr, w.batch_size, w.seq_len, w.grad_checkpoint));
  p.activation_bytes += bf16_scratch;
  p.memory_bytes = p.state_bytes + p.activation_bytes;
  p.final_model_bytes = w.lora ? 4.0 * static_cast<double>(model::LoraAdapters(cfg, w.lora_config).params().size())
                               : 4.0 * static_cast<double>(cfg.num_params());
  p.rank0_memory_bytes = p.memory_bytes + p.final_model_bytes;
  if (dp >= 2) {
    const double t = w.lora ? static_cast<double>(adapters->params().size()) : static_cast<double>(p.params_per_rank);
    const double frozen = w.lora ? frozen_base_bytes : 0.0;
    const double D = dp;
    p.zero_dp = dp;
    p.zero1_state_bytes = frozen + 8.0 * t + 12.0 * t / D;
    p.zero2_state_bytes = frozen + 4.0 * t + 12.0 * t / D;

    // ZeRO-3 over the replicas (tensor.hpp): the strategy rows' ZeRO-3 on the local model
    // of the tp rank that holds the most (its vocabulary share), over dp ranks.
    model::ModelConfig largest = local;
    for (int r = 0; r < tp; ++r) {
      const model::ModelConfig c = model::tensor_parallel_config(cfg, {r, tp});
      if (c.num_params() > largest.num_params()) largest = c;
    }
    Workload lw = describe_workload(largest, w.lora, w.lora_config, w.batch_size, w.seq_len, w.grad_accum,
                                    w.grad_checkpoint);
    lw.bucket_mb = w.bucket_mb;
    lw.dtype = w.dtype;
    const Strategy zero3{StrategyKind::zero3, 1, 0.0, true, comm::WireDtype::f32, "ZeRO-3", "--zero 3"};
    const MemoryCost m = memory_cost(zero3, lw, dp, replicas.ranks_per_host, replicas.hosts);
    const CommCost c = comm_cost(zero3, lw, dp, replicas.link);
    TensorPlan::Zero3& z = p.zero3;
    z.weight_bytes = m.weights;
    z.grad_bytes = m.grads_in_backward;
    z.optimizer_bytes = m.optimizer;
    z.activation_bytes = m.activations;
    z.buffer_bytes = m.buffers;
    z.memory_bytes = m.peak();
    z.rank0_memory_bytes = z.memory_bytes + p.final_model_bytes;
    z.dp_wire_bytes_per_rank = c.wire_bytes;
    z.dp_comm_s = c.seconds;
    const double mesh_work_s = (one_rank.data_s + one_rank.compute_s / T + one_rank.update_s / (T * D)) * replicas.slow;
    z.step_s = mesh_work_s + p.comm_s + z.dp_comm_s;
    z.speedup = z.step_s > 0.0 ? D * one_rank.total_s() / z.step_s : 0.0;
  }

  // Sequence parallelism (tensor.hpp): halves of R' C 4 bytes per micro-batch, each sending
  // (T-1)/T: 10 per layer, 4 at the ends; the loss's 3 rows-long all-reduces and the norm
  // gradients' all-reduce as all-reduces.
  const auto micro_rows = static_cast<double>(w.batch_size * w.seq_len);
  const double padded_rows = std::ceil(micro_rows / T) * T;
  const double half = padded_rows * static_cast<double>(cfg.dim) * 4.0;
  const double halves = 10.0 * static_cast<double>(cfg.n_layers) + 4.0;
  const double reduced = 3.0 * micro_rows * 4.0 + static_cast<double>(2 * cfg.n_layers + 1) * cfg.dim * 4.0;
  const double A = static_cast<double>(w.grad_accum);
  TensorPlan::Sequence& s = p.sequence;
  const double halves_wire = A * (T - 1.0) / T * halves * half, reduced_wire = A * 2.0 * (T - 1.0) / T * reduced;
  s.wire_bytes_per_rank = halves_wire + reduced_wire;
  // Ring steps: T-1 a half, 2 (T-1) an all-reduce (the loss's two, the norms' one a layer and lnf's).
  s.comm_s = ring_collectives_s(halves_wire, A * halves, T - 1.0, link) +
             ring_collectives_s(reduced_wire, A * static_cast<double>(3 + cfg.n_layers), 2.0 * (T - 1.0), link);
  s.step_s = work_s + s.comm_s;
  s.activation_bytes = static_cast<double>(model::Llama::activation_bytes(
                           local, adapters ? &*adapters : nullptr, w.batch_size, w.seq_len, w.grad_checkpoint, tp)) +
                       bf16_scratch;
  s.memory_bytes = p.state_bytes + s.activation_bytes;
  s.rank0_memory_bytes = s.memory_bytes + p.final_model_bytes;
  return p;
}

nlohmann::json tensor_json(const TensorPlan& p) {
  nlohmann::json j = {{"tp", p.tp},
          {"all_reduce_bytes_per_layer_per_step", p.all_reduce_bytes_per_layer},
          {"all_reduce_bytes_per_step", p.all_reduce_bytes},
          {"all_reduces_per_step", p.all_reduces},
          {"wire_bytes_per_rank_per_step", p.wire_bytes_per_rank},
          {"comm_s", p.comm_s},
          {"step_s", p.step_s},
          {"speedup", p.speedup},
          {"params_per_rank", p.params_per_rank},
          {"split_params", p.split_params},
          {"replicated_params", p.replicated_params},
          {"state_bytes_per_rank", p.state_bytes},
          {"activation_bytes_per_rank", p.activation_bytes},
          {"memory_bytes_per_rank", p.memory_bytes},
          {"final_model_bytes_rank0", p.final_model_bytes},
          {"memory_bytes_rank0", p.rank0_memory_bytes},
          {"sequence_parallel",
           {{"wire_bytes_per_rank_per_step", p.sequence.wire_bytes_per_rank},
            {"comm_s", p.sequence.comm_s},
            {"step_s", p.sequence.step_s},
            {"activation_bytes_per_rank", p.sequence.activation_bytes},
            {"memory_bytes_per_rank", p.sequence.memory_bytes},
            {"memory_bytes_rank0", p.sequence.rank0_memory_bytes}}}};
  if (p.zero_dp > 1) {
    const TensorPlan::Zero3& z = p.zero3;
    j["zero"] = {{"dp", p.zero_dp},
                 {"stage1_state_bytes_per_rank", p.zero1_state_bytes},
                 {"stage2_state_bytes_per_rank", p.zero2_state_bytes},
                 {"stage3",
                  {{"weight_bytes_per_rank", z.weight_bytes},
                   {"grad_bytes_per_rank_in_backward", z.grad_bytes},
                   {"optimizer_bytes_per_rank", z.optimizer_bytes},
                   {"activation_bytes_per_rank", z.activation_bytes},
                   {"buffer_bytes_per_rank", z.buffer_bytes},
                   {"memory_bytes_per_rank", z.memory_bytes},
                   {"memory_bytes_rank0", z.rank0_memory_bytes},
                   {"dp_wire_bytes_per_rank_per_step", z.dp_wire_bytes_per_rank},
                   {"dp_comm_s", z.dp_comm_s},
                   {"step_s", z.step_s},
                   {"speedup", z.speedup}}}};
  }
  return j;
}

}  // namespace flotilla::plan
