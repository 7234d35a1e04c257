// The planner's pipeline model (plan/pipeline.hpp): the bubble (P-1)/(M'+P-1) over the
// step's A x M micro-batches, the point-to-point bytes 2 A B T C floats per boundary, the
// activation slots of 1F1B (min(P-s, M')) and GPipe (M'), and a step that the bubble
// stretches and the stages shorten.
#include "flotilla/plan/pipeline.hpp"

#include <gtest/gtest.h>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/plan/mesh.hpp"

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
  // A slot: what the stage's layers write of a micro-batch's activations; the head's
  // (logits included) on the last stage only.
  auto slot = [&](int s) {
    return static_cast<double>(model::Llama::stage_activation_bytes(w.model, nullptr, 2, 32, false,
                                                                    {p.ranges[s].begin, p.ranges[s].end}));
  };
  EXPECT_DOUBLE_EQ(p.activation_bytes[0], 4 * slot(0));
  EXPECT_DOUBLE_EQ(p.activation_bytes[3], slot(3));
  const double whole = static_cast<double>(model::Llama::activation_bytes(w.model, nullptr, 2, 32));
  EXPECT_LT(slot(0), whole / 2);  // 2 of 8 layers and no logits
  EXPECT_GT(slot(3), slot(1));    // the same number of layers, plus the head
  EXPECT_LT(slot(3), whole);
  // 8 layers in 4 stages of 2; the last also has the head: the slowest share is above 1/4.
  EXPECT_GT(p.slowest_stage_share, 0.25);
  EXPECT_LT(p.slowest_stage_share, 0.3);
  EXPECT_NEAR(p.step_s, 8.0 * p.slowest_stage_share / (1.0 - p.bubble) + p.comm_s + 0.4 * p.slowest_stage_share, 1e-12);
  EXPECT_GT(p.speedup, 1.0);
  const PipelinePlan g = plan_pipeline(w, one, 4, 4, parallel::PipelineSchedule::gpipe, link);
  EXPECT_EQ(g.slots, (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_DOUBLE_EQ(g.bubble, p.bubble);
}

// Each stage's state is 16 bytes a float of the tensors a stage model holds
// (model::Llama::hold_only): up to the 16-float alignment padding between tensors, which the
// plan counts with the tensor before it.
TEST(PipelinePlan, EachStageHoldsSixteenBytesAParameterOfItsOwnTensors) {
  for (const bool tied : {false, true}) {
    model::ModelConfig cfg;
    cfg.n_layers = 8;
    cfg.vocab_size = 64;
    cfg.tie_embeddings = tied;
    const Workload w = describe_workload(cfg, false, {}, 8, 32, 1);
    const PipelinePlan p = plan_pipeline(w, StepCost{}, 3, 4, parallel::PipelineSchedule::one_f_one_b, Link{});
    ASSERT_EQ(p.state_bytes.size(), 3u);
    double sum = 0.0;
    for (size_t s = 0; s < 3; ++s) {
      model::Llama m(cfg);
      m.hold_only(p.ranges[s]);
      double held = 0.0, tensors = 0.0;
      for (const auto& [begin, end] : m.held_ranges()) held += static_cast<double>(end - begin);
      for (const model::ParamInfo& info : m.layout().params()) tensors += m.holds(info) ? 1.0 : 0.0;
      EXPECT_GE(p.state_bytes[s], 16.0 * held) << "stage " << s << " tied " << tied;
      EXPECT_LE(p.state_bytes[s], 16.0 * (held + 16.0 * tensors)) << "stage " << s << " tied " << tied;
      EXPECT_DOUBLE_EQ(p.memory_bytes[s], p.state_bytes[s] + p.activation_bytes[s]);
      sum += p.state_bytes[s];
    }
    // Together the whole model once; a tied embedding twice (both ends hold it).
    const double embed = static_cast<double>(w.zero3_group_floats.front());
    EXPECT_DOUBLE_EQ(sum, 16.0 * (static_cast<double>(w.model_floats) + (tied ? embed : 0.0)));
  }
}

TEST(PipelinePlan, ZeroOneOverTheReplicasShardsEachStagesMoments) {
  // pp=2 on 4 ranks: 2 replicas. A stage of f floats: 16f plain, 8f + 12f/2 = 14f at ZeRO-1.
  const Workload w = describe_workload(model::ModelConfig{}, false, {}, 8, 32, 1);
  const PipelinePlan p = plan_pipeline(w, StepCost{}, 2, 4, parallel::PipelineSchedule::one_f_one_b, Link{}, 2);
  ASSERT_EQ(p.zero_dp, 2);
  ASSERT_EQ(p.zero1_state_bytes.size(), 2u);
  for (size_t s = 0; s < 2; ++s) EXPECT_DOUBLE_EQ(p.zero1_state_bytes[s], 14.0 / 16.0 * p.state_bytes[s]) << s;
  EXPECT_EQ(pipeline_json(p)["zero1"]["dp"], 2);
  EXPECT_TRUE(plan_pipeline(w, StepCost{}, 2, 4, parallel::PipelineSchedule::one_f_one_b, Link{}).zero1_state_bytes.empty());
}

TEST(PipelinePlan, RefusesMicroBatchesThatDoNotDivideAndTooManyStages) {
  const Workload w = workload(6, 1);
  StepCost one;
  one.compute_s = 1.0;
  EXPECT_THROW(plan_pipeline(w, one, 2, 4, parallel::PipelineSchedule::gpipe, Link{}), InputError);
  EXPECT_THROW(plan_pipeline(w, one, 9, 2, parallel::PipelineSchedule::gpipe, Link{}), InputError);
}

// pp x tp (plan/mesh.hpp): a rank is its tp rank's slice of its stage; the stages' tp
// bytes add up to tensor parallelism's alone, point to point is the pipeline's per rank.
TEST(PipelinePlan, StageZeroPeaksWithTheLargestTensorItReceivesToWriteTheModel) {
  // Stage 0 writes the final model tensor by tensor, receiving each other stage's tensor
  // into its arena and handing it back once written: the largest such one joins its peak.
  Link link;
  model::ModelConfig cfg;
  cfg.n_layers = 8;
  cfg.vocab_size = 64;  // the head (64 x 64) is narrower than an MLP matrix (128 x 64)
  const Workload w = describe_workload(cfg, false, {}, 8, 32, 1);
  const PipelinePlan p = plan_pipeline(w, StepCost{}, 4, 4, parallel::PipelineSchedule::one_f_one_b, link);
  EXPECT_DOUBLE_EQ(p.final_write_bytes, 4.0 * 128 * 64);
  EXPECT_DOUBLE_EQ(p.peak_bytes[0], p.memory_bytes[0] + 4.0 * 128 * 64);
  for (size_t s = 1; s < 4; ++s) EXPECT_DOUBLE_EQ(p.peak_bytes[s], p.memory_bytes[s]);
  cfg.vocab_size = 1000;  // an untied head of 1000 x 64: the largest
  const PipelinePlan h = plan_pipeline(describe_workload(cfg, false, {}, 8, 32, 1), StepCost{}, 4, 4,
                                       parallel::PipelineSchedule::one_f_one_b, link);
  EXPECT_DOUBLE_EQ(h.final_write_bytes, 4.0 * 1000 * 64);
  cfg.tie_embeddings = true;  // tied: the head is stage 0's own embedding
  const PipelinePlan t = plan_pipeline(describe_workload(cfg, false, {}, 8, 32, 1), StepCost{}, 4, 4,
                                       parallel::PipelineSchedule::one_f_one_b, link);
  EXPECT_DOUBLE_EQ(t.final_write_bytes, 4.0 * 128 * 64);
  EXPECT_EQ(pipeline_json(t)["peak_bytes"].size(), 4u);
}

TEST(MeshPlan, PipelineStagesOfTensorParallelGroupsComposeBothPlans) {
  const Workload w = workload(8, 2);
  StepCost one;
  one.compute_s = 8.0;
  one.update_s = 0.4;
  Link link;
  link.bandwidth_bytes_per_s = 1e9;
  link.latency_s = 1e-5;
  const MeshPlan m = plan_mesh(w, one, 4, 2, 4, link, link);
  const PipelinePlan pp = plan_pipeline(w, one, 4, 4, parallel::PipelineSchedule::one_f_one_b, link);
  const TensorPlan tp = plan_tensor_parallel(w, one, 2, link);
  EXPECT_DOUBLE_EQ(m.stages.max_rank_send_bytes, pp.max_rank_send_bytes);  // the whole activations per tp rank
  double reduced = 0.0;
  for (const double b : m.tp_all_reduce_bytes) reduced += b;
  EXPECT_DOUBLE_EQ(reduced, tp.all_reduce_bytes);
  const double activation = 2.0 * 8 * 32 * 64 * 4;  // A B S C 4
  EXPECT_DOUBLE_EQ(m.tp_all_reduce_bytes[1], 2 * 4 * activation);  // a middle stage: 2 layers
  EXPECT_DOUBLE_EQ(m.tp_all_reduce_bytes[0], (2 * 4 + 1) * activation);  // and the embedding
  EXPECT_DOUBLE_EQ(m.tp_wire_bytes[0], m.tp_all_reduce_bytes[0]);  // a ring of 2 sends 2 (T-1)/T
  // A rank's state: its tp slice of its stage's tensors, under the stage's whole.
  const Workload local = describe_workload(model::tensor_parallel_config(w.model, {0, 2}), false, {}, 8, 32, 2);
  const PipelinePlan sliced = plan_pipeline(local, one, 4, 4, parallel::PipelineSchedule::one_f_one_b, link);
  for (size_t s = 0; s < 4; ++s) {
    EXPECT_DOUBLE_EQ(m.stages.state_bytes[s], sliced.state_bytes[s]);
    EXPECT_LT(m.stages.state_bytes[s], 0.6 * pp.state_bytes[s]);
  }
  EXPECT_GT(m.step_s, m.stages.step_s);  // plus the all-reduces
  EXPECT_LT(m.step_s, pp.step_s);        // each stage's compute halved
}

TEST(MeshPlan, SequenceParallelStagesSendTheirRowsAndTheHalvesTpAloneSends) {
  // pp=4,tp=2, 4 micro-batches of 2 rows x 32 tokens, A = 2: M' = 8 micro-batches of 64
  // rows; a half (one whole micro-batch buffer) 64 x 64 x 4 = 16384 bytes, of which an
  // all-gather or reduce-scatter over 2 ranks sends half.
  const Workload w = workload(8, 2);
  StepCost one;
  one.compute_s = 8.0;
  Link link;
  link.bandwidth_bytes_per_s = 1e9;
  link.latency_s = 1e-5;
  const MeshPlan m = plan_mesh(w, one, 4, 2, 4, link, link);
  const MeshPlan::Sequence& q = m.sequence;
  EXPECT_DOUBLE_EQ(q.max_rank_send_bytes, m.stages.max_rank_send_bytes / 2);  // each tp rank's rows
  // Stage 0: 2 layers' 10 halves and the embedding's 2; its 2 layers' 4 norms' gradients
  // all-reduced (over 2 ranks a ring sends all of them).
  EXPECT_DOUBLE_EQ(q.tp_wire_bytes[0], 8 * ((10 * 2 + 2) * 8192.0 + 4 * 64 * 4.0));
  EXPECT_DOUBLE_EQ(q.tp_wire_bytes[1], 8 * (10 * 2 * 8192.0 + 4 * 64 * 4.0));
  // The last: lm_head's input both ways, lnf's gradient and the loss's 3 floats a row.
  EXPECT_DOUBLE_EQ(q.tp_wire_bytes[3], 8 * ((10 * 2 + 2) * 8192.0 + (5 * 64 + 3 * 64) * 4.0));
  // Together: tp alone's on the same micro-batches (B/M rows, A M of them).
  const TensorPlan tp = plan_tensor_parallel(workload(2, 8), one, 2, link);
  EXPECT_DOUBLE_EQ(q.tp_wire_bytes[0] + q.tp_wire_bytes[1] + q.tp_wire_bytes[2] + q.tp_wire_bytes[3],
                   tp.sequence.wire_bytes_per_rank);
  for (size_t s = 0; s < 4; ++s) {
    EXPECT_LT(q.activation_bytes[s], m.stages.activation_bytes[s]);  // the residual stream's rows sharded
    EXPECT_DOUBLE_EQ(q.memory_bytes[s], m.stages.state_bytes[s] + q.activation_bytes[s]);
  }
  EXPECT_GT(q.step_s, 0.0);
  EXPECT_EQ(mesh_json(m)["sequence_parallel"]["tp_wire_bytes_per_rank_per_step"].size(), 4u);
}

TEST(MeshPlan, AtTheEndEveryRankHoldsItsSliceOfEveryStageAndRankZeroTheWholeModel) {
  // The stages broadcast their tensors over the pp group (each rank's arena then holds its
  // tp slice of all of them), and world rank 0 gathers the whole model from its tp group.
  const Workload w = workload(8, 1);
  const MeshPlan m = plan_mesh(w, StepCost{}, 4, 2, 4, Link{}, Link{});
  const double local = 4.0 * static_cast<double>(model::tensor_parallel_config(w.model, {0, 2}).num_params());
  const double whole = 4.0 * static_cast<double>(w.model.num_params());
  EXPECT_DOUBLE_EQ(m.final_model_bytes, whole);
  for (size_t s = 0; s < 4; ++s) {
    const double others = local - m.stages.state_bytes[s] / 4.0;  // the other stages' slices
    EXPECT_GT(others, 0.0);
    EXPECT_DOUBLE_EQ(m.peak_bytes[s], m.stages.memory_bytes[s] + others + (s == 0 ? whole : 0.0));
    EXPECT_DOUBLE_EQ(m.sequence.peak_bytes[s], m.sequence.memory_bytes[s] + others + (s == 0 ? whole : 0.0));
  }
}

}  // namespace
}  // namespace flotilla::plan
