#include "flotilla/plan/pipeline.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <optional>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"

namespace flotilla::plan {

PipelinePlan plan_pipeline(const Workload& w, const StepCost& one_rank, int stages, int64_t micro_batches,
                           parallel::PipelineSchedule schedule, const Link& link, int dp, double slow) {
  if (micro_batches < 1 || w.batch_size % micro_batches != 0)
    throw InputError("plan", fmt::format("--micro-batches {} does not divide --batch-size {}", micro_batches,
                                         w.batch_size));
  PipelinePlan p;
  p.stages = stages;
  p.micro_batches = micro_batches;
  p.schedule = schedule;
  p.ranges = parallel::balance_stages(w.model, stages, w.seq_len);
  const int64_t flush = micro_batches * w.grad_accum;  // M'
  const double P = stages, Mf = static_cast<double>(flush);
  p.bubble = (P - 1.0) / (Mf + P - 1.0);
  const double step_floats = static_cast<double>(w.grad_accum * w.batch_size * w.seq_len * w.model.dim);
  p.boundary_bytes = 2.0 * step_floats * 4.0;
  p.p2p_bytes = (P - 1.0) * p.boundary_bytes;
  // A middle stage sends activations up and gradients down; an end stage one of them.
  p.max_rank_send_bytes = stages > 2 ? p.boundary_bytes : stages == 2 ? p.boundary_bytes / 2.0 : 0.0;
  const double messages = stages > 2 ? 2.0 * Mf : stages == 2 ? Mf : 0.0;
  p.comm_s = p.max_rank_send_bytes / link.bandwidth_bytes_per_s + messages * link.latency_s;
  const double block = parallel::block_cost(w.model, w.seq_len), head = parallel::head_cost(w.model);
  const double total = static_cast<double>(w.model.n_layers) * block + head;
  double slowest = 0.0;
  for (const parallel::StageRange& r : p.ranges)
    slowest = std::max(slowest, static_cast<double>(r.end - r.begin) * block + (r.end == w.model.n_layers ? head : 0.0));
  p.slowest_stage_share = slowest / total;
  p.step_s = (one_rank.data_s + one_rank.compute_s * p.slowest_stage_share / (1.0 - p.bubble) +
              one_rank.update_s * p.slowest_stage_share) * slow +
             p.comm_s;
  p.speedup = p.step_s > 0.0 ? one_rank.total_s() / p.step_s : 0.0;
  std::optional<model::LoraAdapters> adapters;
  if (w.lora) adapters.emplace(w.model, w.lora_config);
  for (int s = 0; s < stages; ++s) {
    const int64_t n = schedule == parallel::PipelineSchedule::gpipe ? flush : std::min<int64_t>(stages - s, flush);
    // A slot holds what this stage's layers write of a micro-batch's activations (the
    // head's on the last stage only), and the scratch every stage uses.
    const parallel::StageRange& r = p.ranges[static_cast<size_t>(s)];
    const double slot = static_cast<double>(model::Llama::stage_activation_bytes(
        w.model, adapters ? &*adapters : nullptr, w.batch_size / micro_batches, w.seq_len, w.grad_checkpoint,
        {r.begin, r.end}));
    p.slots.push_back(n);
    p.activation_bytes.push_back(static_cast<double>(n) * slot);
  }
  // The stage's tensors, by ZeRO-3's groups: the embedding, each block, the head.
  const std::vector<int64_t>& groups = w.zero3_group_floats;
  const auto L = static_cast<size_t>(w.model.n_layers);
  for (const parallel::StageRange& r : p.ranges) {
    double floats = 0.0;
    if (groups.size() >= L + 1) {
      for (auto l = static_cast<size_t>(r.begin); l < static_cast<size_t>(r.end); ++l) floats += static_cast<double>(groups[1 + l]);
      const bool last = r.end == w.model.n_layers;
      if (r.begin == 0 || (last && w.tied_embeddings)) floats += static_cast<double>(groups[0]);
      if (last && groups.size() > L + 1) floats += static_cast<double>(groups[L + 1]);
    }
    double state = w.lora ? 4.0 * floats + 16.0 * static_cast<double>(w.trainable_floats) : 16.0 * floats;
    // --dtype bf16: the copies of the stage's tensors, as the model's dense share of them.
    if (w.model_floats > 0) state += w.bf16_copy_bytes(floats / static_cast<double>(w.model_floats));
    p.state_bytes.push_back(state);
    p.memory_bytes.push_back(state + p.activation_bytes[p.state_bytes.size() - 1]);
    if (dp >= 2 && !w.lora) p.zero1_state_bytes.push_back(8.0 * floats + 12.0 * floats / static_cast<double>(dp));
  }
  if (!p.zero1_state_bytes.empty()) p.zero_dp = dp;
  // The final model's write: the largest tensor of a later stage, a block's widest matrix
  // (MLP or attention) or the untied head (the tied one is stage 0's embedding).
  const model::ModelConfig& cfg = w.model;
  if (stages > 1 && !w.lora) {
    const double widest = static_cast<double>(std::max(cfg.ffn_dim, cfg.n_heads * cfg.head_dim)) * cfg.dim;
    const double head = w.tied_embeddings ? 0.0 : static_cast<double>(cfg.vocab_size) * cfg.dim;
    p.final_write_bytes = 4.0 * std::max(widest, head);
  }
  p.peak_bytes = p.memory_bytes;
  if (!p.peak_bytes.empty()) p.peak_bytes[0] += p.final_write_bytes;
  return p;
}

nlohmann::json pipeline_json(const PipelinePlan& p) {
  nlohmann::json ranges = nlohmann::json::array();
  for (const parallel::StageRange& r : p.ranges) ranges.push_back({r.begin, r.end});
  nlohmann::json j = {{"stages", p.stages},
          {"micro_batches", p.micro_batches},
          {"schedule", parallel::pipeline_schedule_name(p.schedule)},
          {"layers", ranges},
          {"bubble", p.bubble},
          {"boundary_bytes_per_step", p.boundary_bytes},
          {"p2p_bytes_per_step", p.p2p_bytes},
          {"max_rank_send_bytes_per_step", p.max_rank_send_bytes},
          {"comm_s", p.comm_s},
          {"slowest_stage_share", p.slowest_stage_share},
          {"step_s", p.step_s},
          {"speedup", p.speedup},
          {"slots", p.slots},
          {"activation_bytes", p.activation_bytes},
          {"state_bytes", p.state_bytes},
          {"memory_bytes", p.memory_bytes},
          {"final_write_bytes", p.final_write_bytes},
          {"peak_bytes", p.peak_bytes}};
  if (p.zero_dp > 1) j["zero1"] = {{"dp", p.zero_dp}, {"state_bytes", p.zero1_state_bytes}};
  return j;
}

}  // namespace flotilla::plan
