#include "flotilla/plan/expert.hpp"

#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::plan {

ExpertPlan plan_expert_parallel(const Workload& w, int ep) {
  const model::ModelConfig& cfg = w.model;
  ExpertPlan p;
  p.ep = ep;
  for (int64_t l = 0; l < cfg.n_layers; ++l)
    if (cfg.moe_layer(l)) ++p.moe_layers;
  const int64_t E = cfg.moe.num_experts, C = cfg.dim, Fe = cfg.moe.expert_ffn_dim;
  p.expert_params = p.moe_layers * E * 3 * C * Fe;
  const double away = static_cast<double>(ep - 1) / static_cast<double>(ep);
  const double rows = static_cast<double>(w.grad_accum * w.batch_size * w.seq_len * cfg.moe.top_k);
  p.all_to_all_bytes_per_layer = 4.0 * rows * static_cast<double>(C) * 4.0 * away;
  p.count_bytes_per_layer = static_cast<double>(w.grad_accum * E) * 8.0 * away;
  p.all_to_all_bytes = static_cast<double>(p.moe_layers) * (p.all_to_all_bytes_per_layer + p.count_bytes_per_layer);
  p.gradient_bytes = comm::all_reduce_wire_fraction(ep) * 4.0 *
                     static_cast<double>(w.trainable_floats - w.trainable_expert_floats);
  const double one = w.lora ? 4.0 : 16.0, held = w.lora ? 4.0 : ep > 1 ? 20.0 : 16.0;
  p.expert_bytes_one_rank = one * static_cast<double>(p.expert_params);
  p.expert_bytes_per_rank = held * static_cast<double>(p.expert_params) / static_cast<double>(ep);
  if (w.lora) {
    const auto adapters = static_cast<double>(w.trainable_expert_floats);
    p.expert_bytes_one_rank += 16.0 * adapters;
    p.expert_bytes_per_rank += 8.0 * adapters + (ep > 1 ? 12.0 : 8.0) * adapters / static_cast<double>(ep);
  }
  return p;
}

std::vector<ExpertPlan> expert_parallel_plans(const Workload& w, int max_ranks) {
  std::vector<ExpertPlan> plans;
  if (!w.model.is_moe()) return plans;
  for (int ep = 2; ep <= max_ranks && ep <= w.model.moe.num_experts; ep *= 2)
    if (w.model.moe.num_experts % ep == 0) plans.push_back(plan_expert_parallel(w, ep));
  return plans;
}

nlohmann::json expert_json(const ExpertPlan& p) {
  return {{"ep", p.ep},
          {"moe_layers", p.moe_layers},
          {"expert_params", p.expert_params},
          {"all_to_all_bytes_per_layer_per_step", p.all_to_all_bytes_per_layer},
          {"count_bytes_per_layer_per_step", p.count_bytes_per_layer},
          {"all_to_all_bytes_per_step", p.all_to_all_bytes},
          {"gradient_bytes_per_step", p.gradient_bytes},
          {"expert_bytes_per_rank", p.expert_bytes_per_rank},
          {"expert_bytes_one_rank", p.expert_bytes_one_rank}};
}

}  // namespace flotilla::plan
