// Pipeline parallelism: the schedules (each micro-batch forward then backward once; GPipe
// all forwards first; 1F1B at most P-s in flight; run against each other they finish, and
// at unit action costs every stage idles (P-1)/(M+P-1) of the flush); stage balancing
// (optimal, contiguous; --pp-layers checked); and P stages run as threads computing what
// one model computes on the whole batch: the loss, and every stage's owned gradients
// after the exchange (tied embeddings summed across the first and last stage; LoRA).
#include "flotilla/parallel/pipeline.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <utility>
#include <random>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "flotilla/parallel/pipeline_sync.hpp"
#include "../test_seed.hpp"

namespace flotilla::parallel {
namespace {

using Kind = PipelineAction::Kind;

TEST(PipelineSchedule, EachMicroBatchRunsForwardThenBackwardOnce) {
  for (const PipelineSchedule kind : {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b})
    for (int P = 1; P <= 5; ++P)
      for (int s = 0; s < P; ++s)
        for (int64_t M = 1; M <= 9; ++M) {
          const std::vector<PipelineAction> actions = stage_schedule(kind, P, s, M);
          ASSERT_EQ(static_cast<int64_t>(actions.size()), 2 * M);
          std::vector<int> forward_at(static_cast<size_t>(M), -1), backward_at(static_cast<size_t>(M), -1);
          for (size_t i = 0; i < actions.size(); ++i) {
            auto& at = actions[i].kind == Kind::forward ? forward_at : backward_at;
            ASSERT_EQ(at[static_cast<size_t>(actions[i].micro)], -1) << "twice";
            at[static_cast<size_t>(actions[i].micro)] = static_cast<int>(i);
          }
          for (int64_t i = 0; i < M; ++i) EXPECT_LT(forward_at[static_cast<size_t>(i)], backward_at[static_cast<size_t>(i)]);
        }
}

TEST(PipelineSchedule, GpipeHoldsEveryMicroBatchAndOneFOneBAtMostPMinusS) {
  for (int P = 1; P <= 5; ++P)
    for (int s = 0; s < P; ++s)
      for (int64_t M = 1; M <= 9; ++M) {
        const auto gpipe = gpipe_schedule(P, s, M);
        EXPECT_EQ(max_in_flight(gpipe), M);
        EXPECT_TRUE(std::all_of(gpipe.begin(), gpipe.begin() + M, [](const PipelineAction& a) { return a.kind == Kind::forward; }));
        const auto ofob = one_f_one_b_schedule(P, s, M);
        EXPECT_EQ(max_in_flight(ofob), std::min<int64_t>(P - s, M)) << fmt::format("P={} s={} M={}", P, s, M);
      }
  // Stage 0 of 4 with 6 micro-batches: warm-up F0 F1 F2, then F3 B0 F4 B1 F5 B2, cool-down B3 B4 B5.
  const std::vector<PipelineAction> expected = {
      {Kind::forward, 0}, {Kind::forward, 1}, {Kind::forward, 2}, {Kind::forward, 3},  {Kind::backward, 0},
      {Kind::forward, 4}, {Kind::backward, 1}, {Kind::forward, 5}, {Kind::backward, 2}, {Kind::backward, 3},
      {Kind::backward, 4}, {Kind::backward, 5}};
  EXPECT_EQ(one_f_one_b_schedule(4, 0, 6), expected);
}

// Runs every stage's schedule against the others at one time unit per action (a stage's
// forward waits for the stage below's, its backward for the stage above's): the makespan,
// and whether it finished at all (a cyclic wait would be a deadlock).
int64_t simulate(PipelineSchedule kind, int P, int64_t M) {
  std::vector<std::vector<PipelineAction>> actions;
  for (int s = 0; s < P; ++s) actions.push_back(stage_schedule(kind, P, s, M));
  std::vector<size_t> next(static_cast<size_t>(P), 0);
  const int64_t never = std::numeric_limits<int64_t>::max();
  // done[s][kind][i]: the time F(i) / B(i) finished on stage s.
  std::vector<std::vector<std::vector<int64_t>>> done(
      static_cast<size_t>(P), std::vector<std::vector<int64_t>>(2, std::vector<int64_t>(static_cast<size_t>(M), never)));
  std::vector<int64_t> free_at(static_cast<size_t>(P), 0);
  for (int64_t t = 0;; ++t) {
    bool all_done = true, progressed = false;
    for (int s = 0; s < P; ++s) {
      auto& n = next[static_cast<size_t>(s)];
      if (n == actions[static_cast<size_t>(s)].size()) continue;
      all_done = false;
      if (free_at[static_cast<size_t>(s)] > t) {
        progressed = true;
        continue;
      }
      const PipelineAction a = actions[static_cast<size_t>(s)][n];
      const int k = a.kind == Kind::forward ? 0 : 1;
      const int from = a.kind == Kind::forward ? s - 1 : s + 1;
      const bool ready = from < 0 || from >= P || done[static_cast<size_t>(from)][static_cast<size_t>(k)][static_cast<size_t>(a.micro)] <= t;
      if (!ready) continue;
      done[static_cast<size_t>(s)][static_cast<size_t>(k)][static_cast<size_t>(a.micro)] = t + 1;
      free_at[static_cast<size_t>(s)] = t + 1;
      ++n;
      progressed = true;
    }
    if (all_done) return *std::max_element(free_at.begin(), free_at.end());
    if (!progressed && t > 4 * (M + P) + 10) return -1;
  }
}

TEST(PipelineSchedule, BothFinishWithABubbleOfPMinusOneOverMPlusPMinusOne) {
  for (const PipelineSchedule kind : {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b})
    for (int P = 1; P <= 5; ++P)
      for (int64_t M = 1; M <= 9; ++M) {
        const int64_t makespan = simulate(kind, P, M);
        ASSERT_GT(makespan, 0) << "deadlock: " << pipeline_schedule_name(kind) << " P=" << P << " M=" << M;
        // Each stage is busy 2M units (M forwards, M backwards) of the makespan; the idle
        // share is (P-1)/(M+P-1) exactly.
        EXPECT_EQ(makespan, 2 * (M + P - 1)) << pipeline_schedule_name(kind) << " P=" << P << " M=" << M;
      }
}

TEST(PipelineStages, BalancedStagesAreContiguousAndMinimiseTheLargestCost) {
  model::ModelConfig cfg;
  cfg.vocab_size = 4096;  // a head worth about two blocks: the last stage takes fewer layers
  for (int64_t L = 1; L <= 9; ++L) {
    cfg.n_layers = L;
    for (int P = 1; P <= L; ++P) {
      const std::vector<StageRange> r = balance_stages(cfg, P, 64);
      ASSERT_EQ(static_cast<int>(r.size()), P);
      EXPECT_EQ(r.front().begin, 0);
      EXPECT_EQ(r.back().end, L);
      for (int s = 0; s < P; ++s) {
        EXPECT_LT(r[static_cast<size_t>(s)].begin, r[static_cast<size_t>(s)].end);
        if (s > 0) EXPECT_EQ(r[static_cast<size_t>(s)].begin, r[static_cast<size_t>(s) - 1].end);
      }
      auto largest = [&](const std::vector<int64_t>& ends) {
        double worst = 0.0;
        int64_t begin = 0;
        for (const int64_t end : ends) {
          worst = std::max(worst, static_cast<double>(end - begin) * block_cost(cfg, 64) + (end == L ? head_cost(cfg) : 0.0));
          begin = end;
        }
        return worst;
      };
      std::vector<int64_t> ends;
      for (const StageRange& x : r) ends.push_back(x.end);
      // Every other cut into P stages (choose P-1 of the L-1 inner boundaries) is no better.
      double best = std::numeric_limits<double>::infinity();
      for (uint32_t mask = 0; mask < (1u << (L - 1)); ++mask) {
        if (__builtin_popcount(mask) != P - 1) continue;
        std::vector<int64_t> e;
        for (int64_t b = 1; b < L; ++b)
          if (mask & (1u << (b - 1))) e.push_back(b);
        e.push_back(L);
        best = std::min(best, largest(e));
      }
      EXPECT_DOUBLE_EQ(largest(ends), best) << "L=" << L << " P=" << P;
    }
  }
}

TEST(PipelineStages, RefusesMoreStagesThanLayersAndBadLayerCounts) {
  model::ModelConfig cfg;
  cfg.n_layers = 3;
  EXPECT_THROW(balance_stages(cfg, 4, 16), InputError);
  const std::vector<int64_t> ok = {2, 1};
  EXPECT_EQ(stages_from_counts(cfg, 2, ok)[1].begin, 2);
  for (const std::vector<int64_t>& bad : {std::vector<int64_t>{2, 2}, std::vector<int64_t>{1, 1, 1}, std::vector<int64_t>{3}})
    EXPECT_THROW(stages_from_counts(cfg, 2, bad), InputError);
  EXPECT_EQ(parse_pp_layers("3, 3,2"), (std::vector<int64_t>{3, 3, 2}));
  for (const char* bad : {"", "3,,2", "0,3", "a", "3,-1", "2.5"}) EXPECT_THROW(parse_pp_layers(bad), InputError) << bad;
  EXPECT_THROW(parse_pipeline_schedule("interleaved"), InputError);
}

struct Case {
  int stages;
  int64_t micro_batches;
  PipelineSchedule schedule;
  bool tied;
  bool lora;
};

// The loss and owned gradients of P threads, one stage each, against one model.
// A stage's owned gradients, concatenated, against the one model's: each within rel of the
// largest reference gradient of its range.
::testing::AssertionResult owned_grads_match(GradientSync& sync, const std::vector<float>& ref_grads, float rel) {
  const std::span<float> got = sync.owned_grads();
  size_t at = 0;
  for (const ArenaRange& r : sync.owned()) {
    float scale = 1e-12f;
    for (int64_t i = r.begin; i < r.end; ++i) scale = std::max(scale, std::abs(ref_grads[static_cast<size_t>(i)]));
    for (int64_t i = r.begin; i < r.end; ++i, ++at) {
      const float want = ref_grads[static_cast<size_t>(i)];
      if (!(std::abs(got[at] - want) <= rel * scale))
        return ::testing::AssertionFailure() << "float " << i << ": " << got[at] << " against " << want
                                             << ", tolerance " << rel * scale;
    }
  }
  if (at != got.size())
    return ::testing::AssertionFailure() << got.size() << " owned gradients, the ranges cover " << at;
  return ::testing::AssertionSuccess();
}

void expect_pipeline_matches_one_model(const Case& c, uint64_t seed) {
  SCOPED_TRACE(fmt::format("P={} M={} {} tied={} lora={} seed={}", c.stages, c.micro_batches,
                           pipeline_schedule_name(c.schedule), c.tied, c.lora, seed));
  model::ModelConfig cfg;
  cfg.vocab_size = 48;
  cfg.dim = 32;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 8;
  cfg.ffn_dim = 48;
  cfg.n_layers = 5;  // not a multiple of 2 or 4: uneven stages
  cfg.tie_embeddings = c.tied;
  model::LoraConfig lora_cfg;
  lora_cfg.rank = 2;
  lora_cfg.num_layers = 3;  // adapters on layers 2..4 only: the lower stages train nothing
  std::mt19937_64 rng(seed);
  const int64_t B = 4, T = 12;
  data::Batch batch;
  batch.B = B;
  batch.T = T;
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(cfg.vocab_size) - 1);
  for (int64_t i = 0; i < B * T; ++i) {
    batch.tokens.push_back(token(rng));
    batch.targets.push_back(i % 7 == 3 ? model::kIgnoreIndex : token(rng));
  }
  // `hold`: a stage's model, holding only its tensors (the base's: LoRA's adapters are
  // whole on every stage).
  auto make = [&](std::unique_ptr<model::LoraAdapters>& adapters, std::optional<StageRange> hold = std::nullopt) {
    model::Llama m(cfg);
    if (hold) m.hold_only(*hold);
    m.init_random(seed);
    if (c.lora) {
      adapters = std::make_unique<model::LoraAdapters>(cfg, lora_cfg);
      std::mt19937_64 r(seed + 1);
      std::normal_distribution<float> n(0.0f, 0.1f);
      for (float& x : adapters->params()) x = n(r);  // B nonzero: every adapter has a gradient
      m.attach_lora(adapters.get());
    }
    return m;
  };
  std::unique_ptr<model::LoraAdapters> ref_adapters;
  model::Llama ref = make(ref_adapters);
  ref.zero_grads();
  const model::LossSum ref_loss = ref.forward(batch.tokens.data(), batch.targets.data(), B, T);
  ref.backward(1.0f);
  const std::vector<float> ref_grads(ref.trainable().grads.begin(), ref.trainable().grads.end());
  const std::vector<StageRange> ranges = balance_stages(cfg, c.stages, T);

  std::mutex mutex;
  comm::run_threads(c.stages, [&](comm::Communicator& pp) {
    std::unique_ptr<model::LoraAdapters> adapters;
    model::Llama m = make(adapters, ranges[static_cast<size_t>(pp.rank())]);
    PipelineStage stage(pp, ranges, PipelineConfig{.micro_batches = c.micro_batches, .schedule = c.schedule});
    const std::unique_ptr<GradientSync> sync = make_pipeline_sync(m, stage, nullptr);
    sync->zero_grads();
    std::vector<data::Batch> micro;
    stage.split(batch, micro);
    const model::LossSum local = stage.run(m, micro, nullptr);
    const Exchanged ex = sync->exchange(local);
    // Evaluation through the stages: every stage gets the whole batch's loss.
    const model::LossSum eval = stage.forward_only(m, batch);
    std::lock_guard<std::mutex> lock(mutex);
    // The loss: summed in another order (per micro-batch); float rounding only.
    EXPECT_NEAR(ex.global.sum, ref_loss.sum, 1e-5 * std::abs(ref_loss.sum));
    EXPECT_EQ(ex.global.num_tokens, ref_loss.num_tokens);
    EXPECT_LE(stage.peak_slots(), c.schedule == PipelineSchedule::gpipe ? c.micro_batches
                                                                         : std::min<int64_t>(c.stages - pp.rank(), c.micro_batches));
    // Micro-batches sum the rows' products in another order.
    ASSERT_TRUE(owned_grads_match(*sync, ref_grads, 1e-4f)) << "stage " << pp.rank();
    EXPECT_NEAR(eval.sum, ref_loss.sum, 1e-5 * std::abs(ref_loss.sum)) << "stage " << pp.rank();
    EXPECT_EQ(eval.num_tokens, ref_loss.num_tokens);
  });
}

TEST(PipelineStage, StagesComputeWhatOneModelComputes) {
  const uint64_t seed = testing::test_seed();
  for (const PipelineSchedule schedule : {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b}) {
    expect_pipeline_matches_one_model({2, 2, schedule, false, false}, seed);
    expect_pipeline_matches_one_model({4, 4, schedule, true, false}, seed);
    expect_pipeline_matches_one_model({3, 2, schedule, true, false}, seed);
    expect_pipeline_matches_one_model({4, 2, schedule, false, true}, seed);
  }
}

// A mixture of experts in a pipeline: the load-balancing loss is one formula over all the
// stages' MoE layers, so each micro-batch's router statistics go up with its activations
// and the totals come back with its gradients. Three stages of a 4-layer Mixtral-shaped
// model (a large aux coefficient, so the aux gradient is visible), 2 micro-batches under
// each schedule, against one model running the two halves of the batch as accumulation
// steps (the aux loss is per micro-batch on both): every owned gradient (routers included,
// whose aux part on the lower stages needs the upper stages' statistics) and the step's
// token-weighted aux loss, which every stage reports.
TEST(PipelineStage, MixtureOfExpertsStagesShareTheLoadBalancingLoss) {
  const uint64_t seed = testing::test_seed();
  model::ModelConfig cfg;
  cfg.arch = model::Architecture::mixtral;
  cfg.vocab_size = 40;
  cfg.dim = 16;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 4;
  cfg.ffn_dim = 24;
  cfg.n_layers = 4;
  cfg.moe.num_experts = 4;
  cfg.moe.top_k = 2;
  cfg.moe.expert_ffn_dim = 24;
  cfg.moe.norm_topk_prob = true;
  cfg.moe.router_aux_loss_coef = 0.5f;
  cfg.moe.output_router_logits = true;
  std::mt19937_64 rng(seed);
  const int64_t B = 4, T = 8, M = 2;
  data::Batch batch;
  batch.B = B;
  batch.T = T;
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(cfg.vocab_size) - 1);
  for (int64_t i = 0; i < B * T; ++i) {
    batch.tokens.push_back(token(rng));
    batch.targets.push_back(i % 5 == 2 ? model::kIgnoreIndex : token(rng));
  }
  model::Llama ref(cfg);
  ref.init_random(seed);
  ref.zero_grads();
  double ref_aux = 0.0, ref_tokens = 0.0;
  const int64_t rows = B / M;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t at = i * rows * T;
    const model::LossSum loss = ref.forward(batch.tokens.data() + at, batch.targets.data() + at, rows, T);
    ref_aux += ref.router_aux_loss() * static_cast<double>(loss.num_tokens);
    ref_tokens += static_cast<double>(loss.num_tokens);
    ref.backward(1.0f);
  }
  ref_aux /= ref_tokens;
  const std::vector<float> ref_grads(ref.grads().begin(), ref.grads().end());
  const std::vector<StageRange> ranges = {{0, 1}, {1, 3}, {3, 4}};
  for (const PipelineSchedule schedule : {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b}) {
    SCOPED_TRACE(fmt::format("{} seed={}", pipeline_schedule_name(schedule), seed));
    std::mutex mutex;
    comm::run_threads(3, [&](comm::Communicator& pp) {
      model::Llama m(cfg);
      m.hold_only(ranges[static_cast<size_t>(pp.rank())]);
      m.init_random(seed);
      PipelineStage stage(pp, ranges, PipelineConfig{.micro_batches = M, .schedule = schedule});
      const std::unique_ptr<GradientSync> sync = make_pipeline_sync(m, stage, nullptr);
      sync->zero_grads();
      std::vector<data::Batch> micro;
      stage.split(batch, micro);
      (void)sync->exchange(stage.run(m, micro, nullptr));
      std::lock_guard<std::mutex> lock(mutex);
      EXPECT_NEAR(stage.router_aux_loss(), ref_aux, 1e-12 * ref_aux) << "stage " << pp.rank();
      ASSERT_TRUE(owned_grads_match(*sync, ref_grads, 1e-5f)) << "stage " << pp.rank();
    });
  }
}

// A stage's model holds exactly its tensors, with the values the whole model's init gives
// them; the others are never written (they read zero) and are neither zeroed nor copied.
TEST(PipelineStage, AStageModelHoldsOnlyItsTensorsWithTheWholeModelsValues) {
  const uint64_t seed = testing::test_seed();
  model::ModelConfig cfg;
  cfg.vocab_size = 48;
  cfg.dim = 32;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 8;
  cfg.ffn_dim = 48;
  cfg.n_layers = 5;
  for (const bool tied : {false, true}) {
    cfg.tie_embeddings = tied;
    model::Llama whole(cfg);
    whole.init_random(seed);
    const std::vector<StageRange> ranges = balance_stages(cfg, 3, 16);
    const auto owned = stage_owned_ranges(whole, whole.layout(), ranges);
    for (int s = 0; s < 3; ++s) {
      SCOPED_TRACE(fmt::format("tied={} stage {} seed {}", tied, s, seed));
      model::Llama m(cfg);
      m.hold_only(ranges[static_cast<size_t>(s)]);
      m.init_random(seed);
      m.zero_grads();
      m.zero_grads();  // the second zeroes in place: only the held ranges
      std::vector<bool> held(static_cast<size_t>(whole.layout().total_numel()), false);
      for (const auto& [begin, end] : m.held_ranges())
        for (int64_t i = begin; i < end; ++i) held[static_cast<size_t>(i)] = true;
      // Every tensor the stage owns is held; the last stage also holds a tied embedding.
      for (const ArenaRange& r : owned[static_cast<size_t>(s)])
        for (const model::ParamInfo& info : whole.layout().params())
          if (info.offset >= r.begin && info.offset < r.end) EXPECT_TRUE(m.holds(info)) << info.name;
      const bool embed_held = m.holds(*whole.layout().find("model.embed_tokens.weight"));
      EXPECT_EQ(embed_held, s == 0 || (tied && s == 2));
      const std::span<const float> w = whole.params(), got = std::as_const(m).params();
      for (size_t i = 0; i < held.size(); ++i) {
        if (held[i]) ASSERT_EQ(got[i], w[i]) << "float " << i;
        else ASSERT_EQ(got[i], 0.0f) << "float " << i << " of another stage was written";
      }
    }
  }
}

TEST(PipelineStage, OwnedRangesCoverTheArenaOnce) {
  model::ModelConfig cfg;
  cfg.n_layers = 5;
  for (const bool tied : {false, true}) {
    cfg.tie_embeddings = tied;
    model::Llama m(cfg);
    const std::vector<StageRange> ranges = balance_stages(cfg, 3, 16);
    const auto owned = stage_owned_ranges(m, m.layout(), ranges);
    std::vector<int> count(static_cast<size_t>(m.layout().total_numel()), 0);
    for (const auto& stage : owned)
      for (const ArenaRange& r : stage)
        for (int64_t i = r.begin; i < r.end; ++i) ++count[static_cast<size_t>(i)];
    EXPECT_TRUE(std::all_of(count.begin(), count.end(), [](int n) { return n == 1; }));
    EXPECT_EQ(owned[0].front().begin, m.layout().embed.offset());
  }
}

}  // namespace
}  // namespace flotilla::parallel
