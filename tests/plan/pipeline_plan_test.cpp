// The planner's pipeline model (plan/pipeline.hpp): the bubble (P-1)/(M'+P-1) over the
// step's A x M micro-batches, the point-to-point bytes 2 A B T C floats per boundary, the
// activation slots of 1F1B (min(P-s, M')) and GPipe (M'), and a step that the bubble
// stretches and the stages shorten.
#include "flotilla/plan/pipeline.hpp"

#include <gtest/gtest.h>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::plan {
namespace {

Workload workload(int64_t B, int64_t A) {
  model::ModelConfig cfg;
  cfg.n_layers = 8;
  cfg.vocab_size = 64;  // a cheap head: stages of equal layers
  return describe_workload(cfg, false, {}, B, 32, A);
}

TEST(PipelinePlan, BubbleBytesAndSlotsFollowTheirFormulas) {
  const Workload w = workload(8, 2);
  StepCost one;
  one.compute_s = 8.0;
  one.update_s = 0.4;
  Link link;
  link.bandwidth_bytes_per_s = 1e9;
  link.latency_s = 1e-5;
  const PipelinePlan p = plan_pipeline(w, one, 4, 4, parallel::PipelineSchedule::one_f_one_b, link);
  EXPECT_DOUBLE_EQ(p.bubble, 3.0 / (8.0 + 3.0));  // M' = 2 x 4
  const double boundary = 2.0 * 2 * 8 * 32 * 64 * 4;  // 2 A B T C floats
  EXPECT_DOUBLE_EQ(p.boundary_bytes, boundary);
  EXPECT_DOUBLE_EQ(p.p2p_bytes, 3 * boundary);
  EXPECT_DOUBLE_EQ(p.max_rank_send_bytes, boundary);  // a middle stage: both directions
  EXPECT_DOUBLE_EQ(p.comm_s, boundary / 1e9 + 16 * 1e-5);
  EXPECT_EQ(p.slots, (std::vector<int64_t>{4, 3, 2, 1}));
  const double slot = static_cast<double>(model::Llama::activation_bytes(w.model, nullptr, 2, 32));
  EXPECT_DOUBLE_EQ(p.activation_bytes[0], 4 * slot);
  EXPECT_DOUBLE_EQ(p.activation_bytes[3], slot);
  // 8 layers in 4 stages of 2; the last also has the head: the slowest share is above 1/4.
  EXPECT_GT(p.slowest_stage_share, 0.25);
  EXPECT_LT(p.slowest_stage_share, 0.3);
  EXPECT_NEAR(p.step_s, 8.0 * p.slowest_stage_share / (1.0 - p.bubble) + p.comm_s + 0.4 * p.slowest_stage_share, 1e-12);
  EXPECT_GT(p.speedup, 1.0);
  const PipelinePlan g = plan_pipeline(w, one, 4, 4, parallel::PipelineSchedule::gpipe, link);
  EXPECT_EQ(g.slots, (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_DOUBLE_EQ(g.bubble, p.bubble);
}

TEST(PipelinePlan, RefusesMicroBatchesThatDoNotDivideAndTooManyStages) {
  const Workload w = workload(6, 1);
  StepCost one;
  one.compute_s = 1.0;
  EXPECT_THROW(plan_pipeline(w, one, 2, 4, parallel::PipelineSchedule::gpipe, Link{}), InputError);
  EXPECT_THROW(plan_pipeline(w, one, 9, 2, parallel::PipelineSchedule::gpipe, Link{}), InputError);
}

}  // namespace
}  // namespace flotilla::plan
