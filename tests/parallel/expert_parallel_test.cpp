// Expert parallelism (parallel/expert_parallel.hpp, model/moe_parallel.cpp) with ranks as
// threads: a batch split over ep ranks (and dp x ep) gives, summed over the ranks, the
// gradients and the load-balancing loss of one model on the whole batch; each rank's
// experts outside its block get no gradient (they were not run there); and rows lost in
// dispatch are an InternalError.
#include "flotilla/parallel/expert_parallel.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../test_seed.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/internal_error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/parallel/mesh.hpp"
#include "../model/random_model.hpp"

namespace flotilla::parallel {
namespace {

using model::Architecture;
using model::Llama;
using model::ModelConfig;
using model::test_models::tiny_moe;

struct Batch {
  int64_t B = 8, T = 6;
  std::vector<int32_t> tokens, targets;
};

Batch random_batch(Rng& rng, int64_t vocab) {
  Batch b;
  for (int64_t i = 0; i < b.B * b.T; ++i) {
    b.tokens.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    b.targets.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  }
  return b;
}

struct Result {
  std::vector<float> grads;
  double aux = 0.0;
};

// One model on the whole batch: backward(1) sums per-token gradients (the trainer divides).
Result one_rank(const ModelConfig& cfg, uint64_t seed, const Batch& b) {
  Llama m(cfg);
  m.init_random(seed);
  m.forward(b.tokens.data(), b.targets.data(), b.B, b.T);
  m.zero_grads();
  m.backward(1.0f);
  return {std::vector<float>(m.grads().begin(), m.grads().end()), m.router_aux_loss()};
}

// The mesh's data ranks each take their rows of the batch; gradients summed over the data
// group, as the trainer's all-reduce does. Also checks, per rank, that the experts
// outside its block have no gradient.
// With `hold`, each rank's model holds only its block of the experts (Llama::hold_only):
// the other experts' weights must then stay unwritten (zero) through forward and backward.
Result split(const ModelConfig& cfg, uint64_t seed, const Batch& b, const MeshShape& shape, bool hold = false) {
  Result out;
  std::mutex m;
  std::vector<std::string> failures;
  comm::Settings settings;
  settings.timeout = std::chrono::seconds(60);
  comm::run_threads(
      shape.size(),
      [&](comm::Communicator& world) {
        Mesh mesh(world, shape);
        ExpertParallel experts(mesh.ep_group(), mesh.data_group());
        Llama model(cfg);
        const int64_t El = cfg.moe.num_experts / shape.ep;
        if (hold) model.hold_only({.layers = std::nullopt, .experts = {{mesh.coords().ep * El, (mesh.coords().ep + 1) * El}}});
        model.init_random(seed);
        model.set_expert_exchange(&experts);
        const int n = mesh.data_group().size(), r = mesh.data_group().rank();
        const int64_t rows = b.B / n;
        const size_t at = static_cast<size_t>(r * rows * b.T);
        model.forward(b.tokens.data() + at, b.targets.data() + at, rows, b.T);
        model.zero_grads();
        model.backward(1.0f);
        std::vector<float> g(model.grads().begin(), model.grads().end());
        const auto [first, end] = model.local_experts();
        for (const model::ParamInfo& info : model.layout().params()) {
          const size_t pos = info.name.find(".experts.");
          if (pos == std::string::npos) continue;
          const int64_t e = std::stoll(info.name.substr(pos + 9));
          if (e >= first && e < end) continue;
          const auto begin = g.begin() + info.offset;
          if (std::any_of(begin, begin + info.numel, [](float v) { return v != 0.0f; })) {
            std::lock_guard lock(m);
            failures.push_back(fmt::format("rank {}: {} (not its expert) has a gradient", world.rank(), info.name));
          }
          const std::span<const float> w = std::as_const(model).params().subspan(static_cast<size_t>(info.offset),
                                                                                 static_cast<size_t>(info.numel));
          if (hold && (model.holds(info) || std::any_of(w.begin(), w.end(), [](float v) { return v != 0.0f; }))) {
            std::lock_guard lock(m);
            failures.push_back(fmt::format("rank {}: {} (not its expert) is held or written", world.rank(), info.name));
          }
        }
        mesh.data_group().all_reduce(comm::MutView(std::span<float>(g)), comm::ReduceOp::sum, {.name = "grads"});
        if (world.rank() == 0) {
          out.grads = g;
          out.aux = model.router_aux_loss();
        }
      },
      settings);
  for (const std::string& f : failures) ADD_FAILURE() << f;
  return out;
}

// Per tensor, the largest difference relative to the tensor's largest gradient: the ranks
// compute every row as one rank does, and only sums over rows (weight gradients, the
// all-reduce) run in another order, so float32 rounding (~1e-7 per add) bounds it far
// below 1e-5.
void expect_same(const ModelConfig& cfg, const Result& want, const Result& got, const std::string& label) {
  Llama layout_only(cfg);
  ASSERT_EQ(want.grads.size(), got.grads.size());
  for (const model::ParamInfo& info : layout_only.layout().params()) {
    float scale = 0.0f, diff = 0.0f;
    for (int64_t i = info.offset; i < info.offset + info.numel; ++i) {
      scale = std::max(scale, std::abs(want.grads[static_cast<size_t>(i)]));
      diff = std::max(diff, std::abs(want.grads[static_cast<size_t>(i)] - got.grads[static_cast<size_t>(i)]));
    }
    EXPECT_LE(diff, 1e-5f * std::max(scale, 1e-3f)) << label << ": " << info.name;
  }
  EXPECT_NEAR(got.aux, want.aux, 1e-6 * std::abs(want.aux)) << label << ": the aux loss is not the whole batch's";
}

TEST(ExpertParallel, SplitBatchMatchesOneRank) {
  const uint64_t seed = testing::test_seed();
  for (Architecture arch : {Architecture::mixtral, Architecture::qwen2_moe}) {
    const ModelConfig cfg = tiny_moe(arch);
    Rng rng(seed);
    const Batch b = random_batch(rng, cfg.vocab_size);
    const Result want = one_rank(cfg, seed, b);
    for (const MeshShape& shape : {MeshShape{1, 1, 1, 2}, MeshShape{1, 1, 1, 4}, MeshShape{2, 1, 1, 2},
                                   MeshShape{2, 1, 1, 1}}) {
      const std::string label = fmt::format("{} {}", model::architecture_name(arch), shape.to_string());
      expect_same(cfg, want, split(cfg, seed, b, shape), label);
      if (shape.ep > 1) expect_same(cfg, want, split(cfg, seed, b, shape, true), label + " holding its experts");
    }
  }
}

// A rank holding experts [2, 4) of 4 holds every other tensor and those experts, with the
// whole model's initial values, and lists them by group.
TEST(ExpertParallel, AnExpertRankHoldsItsExpertsWithTheWholeModelsValues) {
  const uint64_t seed = testing::test_seed();
  for (Architecture arch : {Architecture::mixtral, Architecture::qwen2_moe}) {
    const ModelConfig cfg = tiny_moe(arch);
    Llama whole(cfg);
    whole.init_random(seed);
    Llama m(cfg);
    m.hold_only({.layers = std::nullopt, .experts = {{2, 4}}});
    m.init_random(seed);
    m.zero_grads();
    m.zero_grads();  // in place: the held ranges only
    EXPECT_FALSE(m.holds_all_experts());
    int64_t expert_floats = 0;
    for (const model::ElementRange& r : m.held_ranges(Llama::TensorGroup::experts)) expert_floats += r.size();
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < cfg.n_layers; ++l) moe_layers += cfg.moe_layer(l) ? 1 : 0;
    EXPECT_EQ(expert_floats, moe_layers * 2 * 3 * cfg.dim * cfg.moe.expert_ffn_dim)
        << "per MoE layer, 2 experts of 3 matrices";
    for (const model::ParamInfo& info : whole.layout().params()) {
      const int64_t e = model::expert_of_tensor(info.name);
      EXPECT_EQ(m.holds(info), e < 0 || e >= 2) << info.name;
      const auto want = std::as_const(whole).params().subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel));
      const auto got = std::as_const(m).params().subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel));
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_EQ(got[i], m.holds(info) ? want[i] : 0.0f) << info.name << " float " << i << " seed " << seed;
    }
  }
}

// The model's tp group on the mesh's tp communicator (the library's collectives: over two
// ranks a sum is the same bits on both).
class CommTensorParallel final : public model::TensorParallelGroup {
 public:
  explicit CommTensorParallel(comm::Communicator& tp) : tp_(tp) {}
  int tp_size() const override { return tp_.size(); }
  int tp_rank() const override { return tp_.rank(); }
  void all_reduce_sum(std::span<float> v, const char* what) override {
    tp_.all_reduce(comm::MutView(v), comm::ReduceOp::sum, {.name = what});
  }
  void all_reduce_sum(std::span<double> v, const char* what) override {
    tp_.all_reduce(comm::MutView(v), comm::ReduceOp::sum, {.name = what});
  }
  void all_reduce_max(std::span<float> v, const char* what) override {
    tp_.all_reduce(comm::MutView(v), comm::ReduceOp::max, {.name = what});
  }
  void all_gather(std::span<const float> slice, std::span<float> whole, const char* what) override {
    tp_.all_gather(comm::ConstView(slice), comm::MutView(whole), {.name = what});
  }
  void reduce_scatter_sum(std::span<const float> whole, std::span<float> slice, const char* what) override {
    tp_.reduce_scatter(comm::ConstView(whole), comm::MutView(slice), comm::ReduceOp::sum, {.name = what});
  }

 private:
  comm::Communicator& tp_;
};

// tp x ep inside the model: 4 ranks, tp=2 x ep=2. Each ep group (the ranks of one tp
// coordinate) exchanges whole token rows; each rank runs its block of experts' tp slices,
// so what comes back is a partial sum, which the mixture's tp all-reduce completes. The
// data group (the 2 ep ranks) splits the batch, the tp ranks run the same rows: summed over
// the data group, each rank's gradients are the slices of one model's on the whole batch,
// and the aux loss is the whole batch's. (The job around it, flotilla train --parallel
// tp=T,ep=E, is not built: docs/parallelism.md.)
TEST(ExpertParallel, TensorParallelExpertsExchangeWholeRowsAndSumTheirSlices) {
  const uint64_t seed = testing::test_seed();
  const ModelConfig cfg = tiny_moe(Architecture::mixtral);
  Rng rng(seed);
  Llama full(cfg);
  model::test_models::fill_order_one(full, rng);  // routers far from uniform: clear choices
  Batch b = random_batch(rng, cfg.vocab_size);
  b.B = 4;
  b.targets.resize(static_cast<size_t>(b.B * b.T));
  // The tp ranks' ln2 rounds otherwise than one rank's: tokens clear of routing ties.
  const std::optional<std::vector<int32_t>> tokens = model::test_models::tokens_clear_of_ties(full, rng, b.B, b.T, 2e-3f);
  ASSERT_TRUE(tokens) << "seed " << seed;
  b.tokens = *tokens;
  full.forward(b.tokens.data(), b.targets.data(), b.B, b.T);
  full.zero_grads();
  full.backward(1.0f);
  const Result want{std::vector<float>(full.grads().begin(), full.grads().end()), full.router_aux_loss()};
  const MeshShape shape{1, 1, 2, 2};
  std::mutex m;
  std::vector<std::string> failures;
  double aux[4] = {0, 0, 0, 0};
  comm::run_threads(4, [&](comm::Communicator& world) {
    Mesh mesh(world, shape);
    ExpertParallel experts(mesh.ep_group(), mesh.data_group());
    CommTensorParallel tp(mesh.tp_group());
    const model::TpRank at{mesh.coords().tp, 2};
    Llama local(model::tensor_parallel_config(cfg, at));
    model::take_slices(local, full, at);
    local.set_tensor_parallel(&tp, cfg);
    local.set_expert_exchange(&experts);
    const int n = mesh.data_group().size(), r = mesh.data_group().rank();
    const int64_t rows = b.B / n;
    const size_t first = static_cast<size_t>(r * rows * b.T);
    local.forward(b.tokens.data() + first, b.targets.data() + first, rows, b.T);
    local.zero_grads();
    local.backward(1.0f);
    std::vector<float> g(local.grads().begin(), local.grads().end());
    mesh.data_group().all_reduce(comm::MutView(std::span<float>(g)), comm::ReduceOp::sum, {.name = "grads"});
    aux[world.rank()] = local.router_aux_loss();
    for (const model::ParamInfo& info : full.layout().params()) {
      const model::ParamInfo& mine = *local.layout().find(info.name);
      std::vector<float> slice(static_cast<size_t>(local.layout().total_numel()));
      model::copy_slice_out(info, mine, at, want.grads, slice);
      float scale = 1e-3f, diff = 0.0f;
      for (int64_t i = mine.offset; i < mine.offset + mine.numel; ++i) {
        scale = std::max(scale, std::abs(slice[static_cast<size_t>(i)]));
        diff = std::max(diff, std::abs(slice[static_cast<size_t>(i)] - g[static_cast<size_t>(i)]));
      }
      // The split sums (o, down, d(ln)) and the rows' sums in another order: float rounding.
      if (diff > 1e-4f * scale) {
        std::lock_guard lock(m);
        failures.push_back(fmt::format("rank {} (tp {}, ep {}): {} off by {} of {}", world.rank(), at.rank,
                                       mesh.coords().ep, info.name, diff, scale));
      }
    }
    local.set_tensor_parallel(nullptr, cfg);
  });
  for (const std::string& f : failures) ADD_FAILURE() << f;
  for (double a : aux) EXPECT_NEAR(a, want.aux, 1e-5 * want.aux);
}

TEST(ExpertParallel, EpThatDoesNotDivideTheExpertsIsRefused) {
  comm::run_threads(3, [](comm::Communicator& world) {
    ExpertParallel experts(world, world);
    Llama model(tiny_moe(Architecture::mixtral));
    EXPECT_THROW(model.set_expert_exchange(&experts), InputError);
  });
}

TEST(ExpertParallel, RowsLostInDispatchAreAnInternalError) {
  comm::run_threads(2, [](comm::Communicator& world) {
    ExpertParallel experts(world, world);
    experts.check_conserved(5, world.rank() == 0 ? 4 : 6);  // 10 routed, 10 received
    EXPECT_THROW(experts.check_conserved(5, world.rank() == 0 ? 3 : 6), InternalError);
  });
}

}  // namespace
}  // namespace flotilla::parallel
