// The planner's expert-parallel model (plan/expert.hpp) against a hand computation on a
// Mixtral-shaped config: the all-to-all bytes of one MoE layer per step (dispatch and
// combine, forward and backward, balanced routing), the counts, and the experts' memory
// per rank.
#include "flotilla/plan/expert.hpp"

#include <gtest/gtest.h>

namespace flotilla::plan {
namespace {

model::ModelConfig mixtral_shaped() {
  model::ModelConfig cfg;
  cfg.arch = model::Architecture::mixtral;
  cfg.n_layers = 2;
  cfg.dim = 64;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.vocab_size = 260;
  cfg.moe.num_experts = 8;
  cfg.moe.top_k = 2;
  cfg.moe.expert_ffn_dim = 128;
  return cfg;
}

TEST(ExpertPlan, AllToAllBytesAndExpertMemoryMatchAHandComputation) {
  // B = 4 rows of T = 32 tokens, A = 2 micro-batches: 256 tokens, 512 rows (K = 2) a step.
  const Workload w = describe_workload(mixtral_shaped(), false, {}, 4, 32, 2);
  const ExpertPlan p = plan_expert_parallel(w, 4);
  EXPECT_EQ(p.moe_layers, 2);
  EXPECT_EQ(p.expert_params, 2 * 8 * 3 * 64 * 128);  // 393216
  // 512 rows of 64 floats, 3/4 of them to the other 3 ranks, four times (dispatch, combine,
  // and both again in backward): 4 x 512 x 64 x 4 bytes x 3/4 = 393216 bytes.
  EXPECT_DOUBLE_EQ(p.all_to_all_bytes_per_layer, 393216.0);
  // Counts: 8 int64 per micro-batch, 3/4 away: 2 x 8 x 8 x 3/4 = 96 bytes.
  EXPECT_DOUBLE_EQ(p.count_bytes_per_layer, 96.0);
  EXPECT_DOUBLE_EQ(p.all_to_all_bytes, 2 * (393216.0 + 96.0));
  // Each rank: 2 of 8 experts a layer, 20 bytes a parameter; one rank: all, 16 bytes.
  EXPECT_DOUBLE_EQ(p.expert_bytes_per_rank, 20.0 * 393216 / 4);
  EXPECT_DOUBLE_EQ(p.expert_bytes_one_rank, 16.0 * 393216);
}

TEST(ExpertPlan, LoraHoldsFourBytesAnExpertParameter) {
  const Workload w = describe_workload(mixtral_shaped(), true, {}, 4, 32, 1);
  const ExpertPlan p = plan_expert_parallel(w, 2);
  EXPECT_DOUBLE_EQ(p.expert_bytes_per_rank, 4.0 * 393216 / 2);
  EXPECT_DOUBLE_EQ(p.all_to_all_bytes_per_layer, 4.0 * 256 * 64 * 4 * 0.5);
}

TEST(ExpertPlan, GradientBytesLeaveOutTheExpertsAndTheirAdapters) {
  // Full: the shared tensors' all-reduce over the ep ranks, the experts not at all.
  const Workload full = describe_workload(mixtral_shaped(), false, {}, 4, 32, 1);
  EXPECT_EQ(full.trainable_expert_floats, 393216);  // 16-float aligned: no padding here
  EXPECT_DOUBLE_EQ(plan_expert_parallel(full, 2).gradient_bytes, 1.0 * 4.0 * (full.trainable_floats - 393216));
  // LoRA rank 8 on q, k, v, o and the experts: a layer's q and o adapters are 8 x (64 + 64)
  // floats, k and v 8 x (64 + 32) (GQA: 2 of 4 heads), so 3584 a layer and 7168 shared; an
  // expert's w1, w3, w2 are 8 x (64 + 128) each: 4608, x 8 experts x 2 layers = 73728.
  model::LoraConfig lora;
  lora.targets = model::LoraConfig::parse_targets("q,k,v,o,w1,w2,w3");
  const Workload w = describe_workload(mixtral_shaped(), true, lora, 4, 32, 1);
  EXPECT_EQ(w.trainable_floats, 7168 + 73728);
  EXPECT_EQ(w.trainable_expert_floats, 73728);
  // Measured by bench/expert_parallel.py (lora-x): 28672 bytes at ep=2, 43008 at ep=4.
  EXPECT_DOUBLE_EQ(plan_expert_parallel(w, 2).gradient_bytes, 28672.0);
  EXPECT_DOUBLE_EQ(plan_expert_parallel(w, 4).gradient_bytes, 43008.0);
  // Memory: the base's experts 4 bytes a parameter over ep; every adapter's weights and
  // gradient (8 bytes), the own block's moments and owned copy (12 bytes over ep).
  const ExpertPlan p = plan_expert_parallel(w, 2);
  EXPECT_DOUBLE_EQ(p.expert_bytes_per_rank, 4.0 * 393216 / 2 + 8.0 * 73728 + 12.0 * 73728 / 2);
  EXPECT_DOUBLE_EQ(p.expert_bytes_one_rank, 4.0 * 393216 + 16.0 * 73728);
}

TEST(ExpertPlan, OnlyEpThatDividesTheExpertsAndNoneForADenseModel) {
  model::ModelConfig cfg = mixtral_shaped();
  cfg.moe.num_experts = 4;
  std::vector<ExpertPlan> plans = expert_parallel_plans(describe_workload(cfg, false, {}, 4, 32, 1), 16);
  ASSERT_EQ(plans.size(), 2u);
  EXPECT_EQ(plans[0].ep, 2);
  EXPECT_EQ(plans[1].ep, 4);
  cfg.moe = {};
  EXPECT_TRUE(expert_parallel_plans(describe_workload(cfg, false, {}, 4, 32, 1), 16).empty());
}

}  // namespace
}  // namespace flotilla::plan
