// The planner's tensor-parallel model (plan/tensor.hpp) against a hand computation on a
// small llama with a vocabulary tp=2 does not divide: the activation all-reduce bytes per
// layer and per step, their time on a link, the step, and the parameters and state one
// rank holds; and the recommendation of tp where a replica does not fit a machine and
// ZeRO's traffic is more than the link carries in a step, but not where ZeRO does as well.
#include "flotilla/plan/tensor.hpp"

#include <gtest/gtest.h>

#include "flotilla/model/lora.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include <cmath>

#include "flotilla/plan/plan.hpp"

namespace flotilla::plan {
namespace {

model::ModelConfig small_llama() {
  model::ModelConfig cfg;
  cfg.n_layers = 2;
  cfg.dim = 64;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.ffn_dim = 192;
  cfg.vocab_size = 37;
  return cfg;
}

TEST(TensorPlan, AllReduceBytesStepAndMemoryMatchAHandComputation) {
  // B = 4 rows of S = 32 tokens, A = 2 micro-batches: 256 rows of 64 floats a step, one
  // activation all-reduce 256 x 64 x 4 = 65536 bytes.
  const Workload w = describe_workload(small_llama(), false, {}, 4, 32, 2);
  StepCost cost;
  cost.data_s = 0.01;
  cost.compute_s = 1.0;
  cost.update_s = 0.1;
  const Link link{1e9, 1e-5, "given"};
  const TensorPlan p = plan_tensor_parallel(w, cost, 2, link);
  EXPECT_DOUBLE_EQ(p.all_reduce_bytes_per_layer, 4 * 65536.0);  // 2 forward, 2 backward
  // 2 layers; the embedding and d(lnf), 65536 each; the loss's max and two sums, 3 x 256 x 4.
  EXPECT_DOUBLE_EQ(p.all_reduce_bytes, 2 * 262144.0 + 2 * 65536.0 + 3072.0);  // 658432
  EXPECT_EQ(p.all_reduces, 2 * (4 * 2 + 4));
  // A ring over 2 ranks sends half of each all-reduce's bytes twice: all of them.
  EXPECT_DOUBLE_EQ(p.wire_bytes_per_rank, 658432.0);
  // 24 all-reduces of 2 ring steps each, and the mismatch check's exchange before each.
  EXPECT_DOUBLE_EQ(p.comm_s, 658432.0 / 1e9 + 24 * (2 + 1) * 1e-5);
  EXPECT_DOUBLE_EQ(p.step_s, 0.01 + 1.1 / 2 + p.comm_s);
  EXPECT_DOUBLE_EQ(p.speedup, 1.11 / p.step_s);
  // The whole model: 2 x (attention 12288 + MLP 36864 + norms 128) + embedding and lm_head
  // 2 x 37 x 64 + the final norm 64 = 103360, of which the 5 norms (320) are replicated.
  EXPECT_EQ(p.replicated_params, 320);
  EXPECT_EQ(p.split_params, 103360 - 320);
  // Rank 1 holds 19 of the 37 vocabulary rows: 2 x (6144 + 18432 + 128) + 2 x 19 x 64 + 64.
  EXPECT_EQ(p.params_per_rank, 51904);
  EXPECT_EQ(p.params_per_rank, (103360 - 320) / 2 + 320 + 64);  // Ψ/T + the norms + half a row of each
  EXPECT_DOUBLE_EQ(p.state_bytes, 16.0 * 51904);
  EXPECT_GT(p.activation_bytes, 0.0);
  EXPECT_DOUBLE_EQ(p.memory_bytes, p.state_bytes + p.activation_bytes);
  // World rank 0 gathers the whole model's 103360 float32 weights to write it at the end.
  EXPECT_DOUBLE_EQ(p.final_model_bytes, 4.0 * 103360);
  EXPECT_DOUBLE_EQ(p.rank0_memory_bytes, p.memory_bytes + 4.0 * 103360);
  EXPECT_DOUBLE_EQ(p.sequence.rank0_memory_bytes, p.sequence.memory_bytes + 4.0 * 103360);
  EXPECT_DOUBLE_EQ(tensor_json(p)["memory_bytes_rank0"].get<double>(), p.rank0_memory_bytes);
}

// A mixture of experts at tp=2 (its experts split as dense MLPs, the routers whole): each
// rank holds half of every expert and a whole router, and each MoE layer adds to the dense
// all-reduces its combine weights' gradient (K = 2 floats a row) in backward.
TEST(TensorPlan, MixtureOfExpertsHoldsHalfOfEachExpertAndWholeRouters) {
  model::ModelConfig cfg = small_llama();
  cfg.arch = model::Architecture::mixtral;
  cfg.ffn_dim = 128;
  cfg.moe.num_experts = 8;
  cfg.moe.top_k = 2;
  cfg.moe.expert_ffn_dim = 128;
  ASSERT_TRUE(tensor_parallel_splits(describe_workload(cfg, false, {}, 4, 32, 2), 2));
  const Workload w = describe_workload(cfg, false, {}, 4, 32, 2);
  const TensorPlan p = plan_tensor_parallel(w, StepCost{}, 2, Link{1e9, 1e-5, "given"});
  // Routers: 8 x 64 a layer; the norms 5 x 64.
  EXPECT_EQ(p.replicated_params, 5 * 64 + 2 * 8 * 64);
  EXPECT_EQ(p.split_params, cfg.num_params() - p.replicated_params);
  // Rank 1 (19 of 37 vocabulary rows): attention halved, each expert's 3 x 64 x 128 halved.
  const int64_t experts_half = 2 * 8 * 3 * 64 * 64;
  const int64_t attention_half = 2 * (64 * 32 + 2 * 64 * 16 + 32 * 64);
  EXPECT_EQ(p.params_per_rank, experts_half + attention_half + 5 * 64 + 2 * 8 * 64 + 2 * 19 * 64);
  // The dense model's 658432 bytes and 24 all-reduces, plus 256 rows x 2 floats x 4 bytes
  // and one all-reduce per MoE layer and micro-batch.
  EXPECT_DOUBLE_EQ(p.all_reduce_bytes, 658432.0 + 2 * 256 * 2 * 4.0);
  EXPECT_EQ(p.all_reduces, 2 * (4 * 2 + 4) + 2 * 2);
}

TEST(TensorPlan, BetweenHostsTpsRingGetsTheWholeLink) {
  // tp runs flotilla's own collectives (comm::AllReducer's ring), charged as dp's ring is:
  // at the link's whole bandwidth, between hosts as within one (the same bytes, the same time).
  const Workload w = describe_workload(small_llama(), false, {}, 4, 32, 2);
  StepCost cost;
  cost.compute_s = 1.0;
  const Link within{1e9, 1e-5, "given"};
  const Link between{1e9, 1e-5, "given"};
  const TensorPlan a = plan_tensor_parallel(w, cost, 2, within), b = plan_tensor_parallel(w, cost, 2, between);
  EXPECT_DOUBLE_EQ(b.comm_s, 658432.0 / 1e9 + 24 * 3 * 1e-5);
  EXPECT_DOUBLE_EQ(b.comm_s, a.comm_s);
  EXPECT_DOUBLE_EQ(b.sequence.comm_s, a.sequence.comm_s);
  EXPECT_DOUBLE_EQ(b.step_s, a.step_s);
  // tp is charged alike between hosts and within one.
  PlanRequest r;
  r.workload = w;
  r.cost = cost;
  r.cluster.hosts = 2;
  r.cluster.slots = 1;
  const PlanResult two_hosts = make_plan(r);
  r.cluster.hosts = 1;
  r.cluster.slots = 2;
  r.cluster.local = r.cluster.network;
  const PlanResult one_host = make_plan(r);
  ASSERT_EQ(two_hosts.tensors.size(), 1u);
  ASSERT_EQ(one_host.tensors.size(), 1u);
  EXPECT_DOUBLE_EQ(two_hosts.tensors[0].comm_s, one_host.tensors[0].comm_s);
}

TEST(TensorPlan, SequenceParallelSendsTpsBytesPlusTheBackwardRegathersAndHoldsFewerActivations) {
  // As above: 128 rows a micro-batch (A = 2), one whole buffer 128 x 64 x 4 = 32768 bytes,
  // of which an all-gather or a reduce-scatter over 2 ranks sends half: 16384.
  const Workload w = describe_workload(small_llama(), false, {}, 4, 32, 2);
  StepCost cost;
  cost.compute_s = 1.0;
  const Link link{1e9, 1e-5, "given"};
  const TensorPlan p = plan_tensor_parallel(w, cost, 2, link);
  // Per micro-batch: 10 halves a layer (tp's 4 all-reduces are 8) and 4 at the ends (tp's
  // 2 all-reduces), the loss's 3 x 128 floats and the norms' (2 x 2 + 1) x 64 as all-reduces.
  const double per_micro = (10.0 * 2 + 4) * 16384.0 + (3 * 128 + 5 * 64) * 4.0;
  EXPECT_DOUBLE_EQ(p.sequence.wire_bytes_per_rank, 2 * per_micro);
  // Without the re-gathers (2 halves a layer) and the norms it would be tp's bytes exactly.
  EXPECT_DOUBLE_EQ(p.sequence.wire_bytes_per_rank - 2 * (2.0 * 2 * 16384.0 + 5 * 64 * 4.0), p.wire_bytes_per_rank);
  EXPECT_LT(p.sequence.activation_bytes, p.activation_bytes);
  EXPECT_DOUBLE_EQ(p.sequence.memory_bytes, p.state_bytes + p.sequence.activation_bytes);
}

TEST(TensorPlan, ZeroOverTheReplicasShardsEachSlicesState) {
  // tp=2 on 8 ranks: 4 replicas of each slice. A rank's Ψ_l local parameters: 16 Ψ_l plain,
  // 8 Ψ_l + 12 Ψ_l / 4 at stage 1, 4 Ψ_l + 12 Ψ_l / 4 at stage 2 (docs/sharding.md).
  const Workload w = describe_workload(small_llama(), false, {}, 4, 32, 1);
  const TensorPlan p = plan_tensor_parallel(w, StepCost{}, 2, Link{}, 4);
  const auto local = static_cast<double>(p.params_per_rank);
  EXPECT_EQ(p.zero_dp, 4);
  EXPECT_DOUBLE_EQ(p.state_bytes, 16.0 * local);
  EXPECT_DOUBLE_EQ(p.zero1_state_bytes, 11.0 * local);
  EXPECT_DOUBLE_EQ(p.zero2_state_bytes, 7.0 * local);
  EXPECT_EQ(tensor_json(p)["zero"]["dp"], 4);
  // One replica: no ZeRO figures.
  EXPECT_EQ(plan_tensor_parallel(w, StepCost{}, 2, Link{}).zero_dp, 1);
  EXPECT_FALSE(tensor_json(plan_tensor_parallel(w, StepCost{}, 2, Link{})).contains("zero"));
}

TEST(TensorPlan, ZeroThreeOverTheReplicasShardsEachSliceAndGathersItOverDp) {
  // tp=2 on 8 ranks, ZeRO-3 over the 4 replicas of each slice, by hand from the local model
  // of tp rank 1 (19 of the 37 vocabulary rows: the larger), whose blocks and head are
  // ZeRO-3's groups: 16 bytes a local parameter / 4 (the tail of G mod 4 floats on every
  // rank), 3/4 of the two largest adjacent groups gathered at once, their gradients in
  // backward; and over dp each slice gathered twice and its gradient reduce-scattered.
  const Workload w = describe_workload(small_llama(), false, {}, 4, 32, 1);
  StepCost cost;
  cost.data_s = 0.01;
  cost.compute_s = 1.0;
  cost.update_s = 0.1;
  const Link tp_link{1e9, 1e-5, "given"}, dp_link{1e8, 1e-4, "given"};
  const TensorPlan p = plan_tensor_parallel(w, cost, 2, tp_link, ReplicaMesh{4, dp_link, 1.0, 1, 8}, 1.0);
  const Workload local = describe_workload(model::tensor_parallel_config(small_llama(), {1, 2}), false, {}, 4, 32, 1);
  const auto G = static_cast<double>(local.trainable_floats);
  EXPECT_EQ(local.trainable_floats, p.params_per_rank);
  const double shard = std::floor(G / 4) + std::fmod(G, 4);
  double adjacent = 0.0;
  const std::vector<int64_t>& g = local.zero3_group_floats;
  ASSERT_EQ(g.size(), 4u);  // embedding, 2 blocks, the head (final norm, lm_head)
  for (size_t i = 0; i + 1 < g.size(); ++i) adjacent = std::max(adjacent, static_cast<double>(g[i] + g[i + 1]));
  const TensorPlan::Zero3& z = p.zero3;
  EXPECT_DOUBLE_EQ(z.optimizer_bytes, 8 * shard);
  EXPECT_DOUBLE_EQ(z.weight_bytes, 4 * shard + 0.75 * 4 * adjacent);
  EXPECT_DOUBLE_EQ(z.grad_bytes, 4 * shard + 4 * adjacent);
  EXPECT_DOUBLE_EQ(z.activation_bytes, p.activation_bytes);
  EXPECT_DOUBLE_EQ(z.memory_bytes, z.weight_bytes + z.grad_bytes + z.optimizer_bytes + z.activation_bytes +
                                       z.buffer_bytes);
  EXPECT_DOUBLE_EQ(z.rank0_memory_bytes, z.memory_bytes + p.final_model_bytes);
  // On the dp link: 3/4 of (gathered twice + reduce-scattered), the norm's 8 and the loss's
  // 16 bytes all-reduced (2 x 3/4 each); 3 collectives a layer of 3 ring steps.
  const double floats = static_cast<double>(local.model_floats);
  EXPECT_DOUBLE_EQ(z.dp_wire_bytes_per_rank, 0.75 * (2 * 4 * floats + 4 * G) + 1.5 * (8 + 16));
  EXPECT_NEAR(z.dp_comm_s, 0.75 * (2 * 4 * floats + 4 * G) / 1e8 + 3 * 2 * 3 * 1e-4 + 1.5 * (8 + 16) / 1e8 + 2 * 6 * 1e-4,
              1e-12);
  // The step: data, compute / 2, the update / 8 (each rank updates its shard of its slice),
  // tp's and ZeRO-3's communication; 4 replicas run 4 times tp's rows.
  EXPECT_NEAR(z.step_s, 0.01 + 1.0 / 2 + 0.1 / 8 + p.comm_s + z.dp_comm_s, 1e-12);
  EXPECT_NEAR(z.speedup, 4 * 1.11 / z.step_s, 1e-12);
  const nlohmann::json j = tensor_json(p);
  EXPECT_DOUBLE_EQ(j["zero"]["stage3"]["memory_bytes_per_rank"].get<double>(), z.memory_bytes);
  // One replica: no ZeRO-3 figures.
  EXPECT_EQ(plan_tensor_parallel(w, cost, 2, tp_link).zero3.memory_bytes, 0.0);
}

TEST(TensorPlan, ZeroThreeOverTpReplicasRecommendedWhereItBeatsTheOtherLayouts) {
  // A Qwen2-0.5B-shaped model (2 kv heads: tp is at most 2), full fine-tuning, one row of
  // 1024 tokens a rank, on 2 machines of 2 ranks (10 GB/s inside a machine, 1 Gbit/s
  // between) of 11.75 GiB, 10.6 usable: a replica needs 10.7 GiB at its peak, tp=2's two
  // ranks a machine more, and ZeRO's ranks each hold the whole row's activations (ZeRO-3
  // 6.6 GiB a rank); one row gives a pipeline one micro-batch (a bubble of half or more).
  // dp=2,tp=2 with ZeRO-3 (10.4 GiB on the fullest machine, rank 0's final model included)
  // keeps tp's all-reduces inside a machine, gathers half the model over dp, and runs 2
  // replicas where pp=2,tp=2 runs one.
  model::ModelConfig cfg;
  cfg.arch = model::Architecture::qwen2;
  cfg.qkv_bias = true;
  cfg.dim = 896;
  cfg.n_layers = 24;
  cfg.n_heads = 14;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 64;
  cfg.ffn_dim = 4864;
  cfg.vocab_size = 151936;
  cfg.tie_embeddings = true;
  PlanRequest r;
  r.workload = describe_workload(cfg, false, {}, 1, 1024, 1);
  r.cost.compute_s = 40.0;
  r.cost.update_s = 2.0;
  r.cost.threads = 4;
  r.cluster.hosts = 2;
  r.cluster.slots = 2;
  r.cluster.cores = 8;
  r.cluster.memory_bytes = int64_t{47} << 28;  // 11.75 GiB
  r.cluster.network = {1e9 / 8, 50e-6, "given"};
  r.cluster.local = {10e9, 1e-6, "given"};
  r.rows_per_epoch = 3600.0 * 10 / 42.0 * 4;
  r.train_args = "--model m --data d --batch-size 1 --seq-len 1024";
  const PlanResult p = make_plan(r);
  const Recommendation& rec = p.recommendation;
  EXPECT_EQ(rec.advice, Advice::tensor_parallel_sharded) << render_text(p);
  EXPECT_EQ(rec.strategy, "dp=2,tp=2 ZeRO-3") << rec.reason;
  EXPECT_EQ(rec.ranks, 4);
  EXPECT_NE(rec.command.find("--parallel dp=2,tp=2 --zero 3"), std::string::npos) << rec.command;
  EXPECT_EQ(rec.reason.find('\n'), std::string::npos) << rec.reason;
  EXPECT_NE(render_text(p).find("dp=2,tp=2 --zero 3: memory"), std::string::npos);
}

TEST(TensorPlan, Bf16AddsTheWeightsCopiesThatProductsRead) {
  // small_llama by hand: per layer q and o 64 x 64, k and v 32 x 64, gate and up 192 x 64,
  // down 64 x 192; lm_head 37 x 64; the untied embedding is a lookup (no copy), norms none.
  const double layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 192 * 64;
  EXPECT_EQ(bf16_copy_floats(small_llama()), static_cast<int64_t>(2 * layer + 37 * 64));
  model::ModelConfig tied = small_llama();
  tied.tie_embeddings = true;  // lm_head reads the embedding: its copy instead
  EXPECT_EQ(bf16_copy_floats(tied), static_cast<int64_t>(2 * layer + 37 * 64));
  const Workload f32 = describe_workload(small_llama(), false, {}, 4, 32, 1);
  Workload bf16 = f32;
  bf16.dtype = kernels::GemmInput::bf16;
  const double copies = 2.0 * (2 * layer + 37 * 64);
  EXPECT_DOUBLE_EQ(bf16.bf16_copy_bytes(), copies);
  EXPECT_DOUBLE_EQ(f32.bf16_copy_bytes(), 0.0);
  // Every data-parallel row holds all copies; ZeRO-3's ranks those of the groups in flight.
  for (const Strategy& s : all_strategies({}, f32, 2)) {
    const double extra = memory_cost(s, bf16, 4).weights - memory_cost(s, f32, 4).weights;
    if (s.kind == StrategyKind::zero3)
      EXPECT_LT(extra, copies) << s.name;
    else
      EXPECT_DOUBLE_EQ(extra, copies) << s.name;
    EXPECT_GT(extra, 0.0) << s.name;
    // And the rounded inputs' scratch: 4 x 32 rows of the widest product side (192, the
    // MLP; the vocabulary is 37) twice: the rounded output gradient and input.
    EXPECT_DOUBLE_EQ(memory_cost(s, bf16, 4).buffers - memory_cost(s, f32, 4).buffers, 2.0 * 128 * (192 + 192))
        << s.name;
  }
  // tp: each rank's local tensors' copies (tp rank 1 holds 19 of the 37 lm_head rows).
  const TensorPlan a = plan_tensor_parallel(f32, StepCost{}, 2, Link{}), b = plan_tensor_parallel(bf16, StepCost{}, 2, Link{});
  EXPECT_DOUBLE_EQ(b.state_bytes - a.state_bytes, 2.0 * (layer + 19 * 64));
}

TEST(TensorPlan, RanksSharingAMachinesCoresComputeSlowerAsDataParallelsDo) {
  // Two ranks of one thread on one core of one machine, each 1.5x slower again for sharing
  // it (the measured contention): tp's, the pipeline's and pp x tp's compute 3x one alone's
  // share, as the data-parallel rows charge it; the communication as it was.
  PlanRequest r;
  r.workload = describe_workload(small_llama(), false, {}, 4, 32, 2);
  r.cost.data_s = 0.01;
  r.cost.compute_s = 1.0;
  r.cost.update_s = 0.1;
  r.cost.threads = 1;
  r.cost.contention = 1.5;
  r.cluster.hosts = 1;
  r.cluster.slots = 2;
  r.cluster.cores = 1;
  const PlanResult p = make_plan(r);
  EXPECT_DOUBLE_EQ(compute_slowdown(r.cluster, r.cost, 2), 3.0);
  ASSERT_EQ(p.tensors.size(), 1u);
  const TensorPlan& t = p.tensors[0];
  EXPECT_NEAR(t.step_s, 3.0 * (0.01 + 1.1 / 2) + t.comm_s, 1e-12);
  EXPECT_NEAR(t.sequence.step_s, 3.0 * (0.01 + 1.1 / 2) + t.sequence.comm_s, 1e-12);
  ASSERT_FALSE(p.pipelines.empty());
  const PipelinePlan& pp = p.pipelines[0];
  EXPECT_NEAR(pp.step_s,
              3.0 * (0.01 + 1.0 * pp.slowest_stage_share / (1.0 - pp.bubble) + 0.1 * pp.slowest_stage_share) + pp.comm_s,
              1e-12);
  const TensorPlan alone = plan_tensor_parallel(r.workload, r.cost, 2, r.cluster.local);
  EXPECT_NEAR(t.step_s - alone.step_s, 2.0 * (0.01 + 1.1 / 2), 1e-12);
}

TEST(TensorPlan, OnlyTpThatSplitsTheModel) {
  const Workload w = describe_workload(small_llama(), false, {}, 4, 32, 1);
  const std::vector<TensorPlan> plans = tensor_parallel_plans(w, StepCost{}, 16, [](int) { return Link{}; },
                                                              [](int) { return 1.0; });
  ASSERT_EQ(plans.size(), 1u);  // tp=2 only: 4 does not divide the 2 kv heads
  EXPECT_EQ(plans[0].tp, 2);
}

TEST(TensorPlan, RecommendedWhenAReplicaDoesNotFitAndZeroTrafficExceedsTheLink) {
  // llama2.c's 110M shape, a long run, machines of 1.5 GiB (a replica needs ~2 GiB) on a
  // 1 Gbit/s link, one row of 128 tokens a step: ZeRO's parameter traffic (gigabytes a
  // step) costs far more than tp's activations (tens of megabytes).
  PlanRequest r;
  r.workload = describe_workload(model::preset_config("110M"), false, {}, 1, 128, 1);
  r.cost.compute_s = 9.5;
  r.cost.update_s = 0.5;
  r.cost.threads = 8;
  r.cluster.hosts = 4;
  r.cluster.cores = 8;
  r.cluster.memory_bytes = int64_t{3} << 29;
  r.cluster.network = {1e9 / 8, 50e-6, "given"};
  r.cluster.local = r.cluster.network;
  r.rows_per_epoch = 3600.0 * 10 / 10.0 * 4;
  r.train_args = "--model m --data d --batch-size 1 --seq-len 128";
  const PlanResult p = make_plan(r);
  ASSERT_FALSE(p.tensors.empty());
  const Recommendation& rec = p.recommendation;
  EXPECT_EQ(rec.advice, Advice::tensor_parallel) << rec.reason;
  EXPECT_NE(rec.command.find("--parallel tp="), std::string::npos) << rec.command;
  EXPECT_EQ(rec.reason.find('\n'), std::string::npos) << rec.reason;
  EXPECT_NE(render_text(p).find("tensor parallel (--parallel tp=T"), std::string::npos);
  // 4 rows of 256 tokens on 10 Gbit/s and machines of 2 GiB, where ZeRO fits: tp's
  // activations weigh about as much as ZeRO's parameters, so sharding stays the answer.
  r.workload = describe_workload(model::preset_config("110M"), false, {}, 4, 256, 1);
  r.cluster.network = {10e9 / 8, 50e-6, "given"};
  r.cluster.local = r.cluster.network;
  r.cluster.memory_bytes = int64_t{2} << 30;
  r.train_args = "--model m --data d --batch-size 4 --seq-len 256";
  const PlanResult q = make_plan(r);
  EXPECT_EQ(q.recommendation.advice, Advice::sharding) << render_text(q);
}

TEST(TensorPlan, PipelineStagesOfTpGroupsRecommendedWhereTpFitsAMachineAndThePipelineCrossesTheSlowLink) {
  // Two machines of 2 ranks each, shared memory inside (10 GB/s), 1 Gbit/s between, too
  // small for a replica of llama2.c's 110M with 8 rows of 128 tokens: pp=2,tp=2 keeps tp's
  // all-reduces inside a machine and sends only activations between them, where tp=4's
  // all-reduces and ZeRO's weights cross the slow link, and pp=4 waits on its bubble.
  PlanRequest r;
  r.workload = describe_workload(model::preset_config("110M"), false, {}, 8, 128, 1);
  r.cost.compute_s = 9.5;
  r.cost.update_s = 0.5;
  r.cost.threads = 4;
  r.cluster.hosts = 2;
  r.cluster.slots = 2;
  r.cluster.cores = 8;
  r.cluster.memory_bytes = int64_t{9} << 28;  // 2.25 GiB: a replica needs 2.3 at its peak
  r.cluster.network = {1e9 / 8, 50e-6, "given"};
  r.cluster.local = {10e9, 1e-6, "given"};
  r.rows_per_epoch = 3600.0 * 10 / 10.0 * 8;
  r.train_args = "--model m --data d --batch-size 8 --seq-len 128";
  const PlanResult p = make_plan(r);
  ASSERT_FALSE(p.meshes.empty());
  const Recommendation& rec = p.recommendation;
  EXPECT_EQ(rec.advice, Advice::pipeline_tensor_parallel) << render_text(p);
  EXPECT_EQ(rec.strategy, "pp=2,tp=2") << rec.reason;
  EXPECT_EQ(rec.ranks, 4);
  EXPECT_NE(rec.command.find("--parallel pp=2,tp=2 --micro-batches "), std::string::npos) << rec.command;
  EXPECT_EQ(rec.reason.find('\n'), std::string::npos) << rec.reason;
  EXPECT_NE(rec.reason.find("between stages"), std::string::npos) << rec.reason;
  // The flowchart names every layout it weighed: tp=2, its 2 replicas with ZeRO-3, tp=4,
  // pp=2, pp=4 and pp=2,tp=2.
  int weighed = 0;
  for (const std::string& line : rec.walk) weighed += line.find("on the fullest machine at its peak") != std::string::npos;
  EXPECT_EQ(weighed, 6) << render_text(p);
  // Every machine's 2 ranks at their peak fit, rank 0's gather of the final model included.
  const MeshPlan* chosen = nullptr;
  for (const MeshPlan& m : p.meshes)
    if (m.pp == 2 && m.tp == 2) chosen = &m;
  ASSERT_NE(chosen, nullptr);
  EXPECT_LE(chosen->peak_bytes[0] + chosen->peak_bytes[0] - chosen->final_model_bytes,
            r.memory_headroom * static_cast<double>(r.cluster.memory_bytes));
  // With a fast link between the machines too, tp=4 is no longer held back: the mesh is not chosen.
  r.cluster.network = {100e9 / 8, 1e-6, "given"};
  const PlanResult fast = make_plan(r);
  EXPECT_NE(fast.recommendation.advice, Advice::pipeline_tensor_parallel) << render_text(fast);
}

// LoRA over a 4-bit base (groups of 32, f16 scales and biases): a tp=2 rank holds its
// slices of the packed words, counted as Llama::packed_places lays them out (n/8 words and
// 2 ceil(n/32 x 2 / 4) of scales and biases for n weights). Rank 1 (19 vocabulary rows)
// per layer: q 32x64 320, k and v 16x64 160 each, o 64x32 320, gate and up 96x64 and down
// 64x96 960 each, the norms 128: 3968; the embedding and lm_head 19x64 190 each; the final
// norm 64: 8380 words. Groups of 64 would cut o's 32 columns a rank: no tp=2 plan then.
TEST(TensorPlan, FourBitBaseHoldsItsPackedSlicesAndNeedsWholeGroups) {
  model::ModelConfig cfg = small_llama();
  cfg.quantization = model::QuantizationConfig{QuantFormat{4, 32}, {}};
  const Workload w = describe_workload(cfg, true, {}, 4, 32, 1);
  StepCost cost;
  cost.compute_s = 1.0;
  const TensorPlan p = plan_tensor_parallel(w, cost, 2, Link{1e9, 1e-5, "given"});
  const double adapters = static_cast<double>(
      model::LoraAdapters(model::tensor_parallel_config(cfg, {1, 2}), {}).params().size());
  EXPECT_DOUBLE_EQ(p.state_bytes, 4.0 * 8380 + 16.0 * adapters);
  // The whole base: per layer 640 + 320 + 320 + 640 + 3 x 1920 + 128 = 7808, the embedding
  // and lm_head 37x64 370 each, the final norm 64: 16420 words, of which a rank holds 51%.
  EXPECT_EQ(w.model_floats, 16420);
  EXPECT_TRUE(tensor_parallel_splits(w, 2));
  cfg.quantization = model::QuantizationConfig{QuantFormat{4, 64}, {}};
  EXPECT_FALSE(tensor_parallel_splits(describe_workload(cfg, true, {}, 4, 32, 1), 2));
}

}  // namespace
}  // namespace flotilla::plan
