// The model's rooms for parallel schemes: a layer range runs part of the blocks (a
// pipeline stage) and two stages handing activations and their gradients over at the cut
// compute what the whole model computes, bit for bit; the parallel context's hooks are
// called at the points a scheme needs, in order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"
#include "random_model.hpp"

namespace flotilla::model {
namespace {

using ::flotilla::testing::test_seed;
using test_models::random_tokens;
using test_models::tiny_qwen2;

// O(1) parameters, so that a wrong hand-over changes results by far more than rounding.
void fill(Llama& model, Rng& rng) {
  for (const ParamInfo& info : model.layout().params()) {
    std::span<float> w = model.params().subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel));
    if (info.name.ends_with("norm.weight"))
      rng.fill_uniform(w, 0.5f, 1.5f);
    else
      rng.fill_uniform(w, -0.5f, 0.5f);
  }
}

// The layer a parameter belongs to: its block's index, -1 for the embedding, n_layers for
// the head (final norm, lm_head).
int64_t owner_layer(const std::string& name, int64_t n_layers) {
  if (const size_t at = name.find("layers."); at != std::string::npos) return std::stoll(name.substr(at + 7));
  return name == "model.embed_tokens.weight" ? -1 : n_layers;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

struct Batch {
  int64_t B = 2, T = 6;
  std::vector<int32_t> tokens, targets;
  std::vector<int32_t> doc_start = {0, 0, 0, 3, 3, 3, 0, 0, 2, 2, 2, 2};  // packed rows
};

class LayerRangeTest : public ::testing::TestWithParam<std::pair<int64_t, bool>> {};

TEST_P(LayerRangeTest, TwoStagesEqualTheWholeModelBitForBit) {
  const auto [cut, checkpoint] = GetParam();
  Rng rng(test_seed());
  const ModelConfig cfg = tiny_qwen2(4);
  const int64_t L = cfg.n_layers;
  Llama whole(cfg);
  fill(whole, rng);
  Batch b;
  b.tokens = random_tokens(rng, b.B * b.T, cfg.vocab_size);
  b.targets = random_tokens(rng, b.B * b.T, cfg.vocab_size);

  whole.set_grad_checkpoint(checkpoint);
  whole.zero_grads();
  const LossSum loss = whole.forward(b.tokens.data(), b.targets.data(), b.B, b.T, b.doc_start.data());
  const std::vector<float> logits(whole.logits().begin(), whole.logits().end());
  const float scale = 1.0f / static_cast<float>(loss.num_tokens);
  whole.backward(scale);

  // Each stage is its own model with the same weights, as on two ranks.
  Llama first(cfg), second(cfg);
  for (Llama* m : {&first, &second}) {
    std::copy(whole.params().begin(), whole.params().end(), m->params().begin());
    m->set_grad_checkpoint(checkpoint);
    m->zero_grads();
  }
  first.set_layer_range({0, cut});
  second.set_layer_range({cut, L});
  // forward: first -> activations at the cut -> second (which has the targets)
  first.forward(b.tokens.data(), nullptr, b.B, b.T, b.doc_start.data());
  const std::span<const float> handed = first.stage_output();
  std::span<float> input = second.stage_input(b.B, b.T);
  ASSERT_EQ(handed.size(), input.size());
  std::copy(handed.begin(), handed.end(), input.begin());
  const LossSum stage_loss = second.forward(b.tokens.data(), b.targets.data(), b.B, b.T, b.doc_start.data());
  EXPECT_EQ(stage_loss.sum, loss.sum);
  EXPECT_EQ(stage_loss.num_tokens, loss.num_tokens);
  const std::span<const float> stage_logits = second.logits();
  ASSERT_EQ(stage_logits.size(), logits.size());
  for (size_t i = 0; i < logits.size(); ++i) ASSERT_TRUE(same_bits(stage_logits[i], logits[i])) << "logit " << i;
  // backward: second -> gradient at the cut -> first
  second.backward(scale);
  const std::span<const float> dinput = second.stage_input_grad();
  std::span<float> doutput = first.stage_output_grad();
  ASSERT_EQ(dinput.size(), doutput.size());
  std::copy(dinput.begin(), dinput.end(), doutput.begin());
  first.backward(scale);

  // Every parameter's gradient comes from the stage that holds its layer; the other stage
  // leaves it zero.
  for (const ParamInfo& info : whole.layout().params()) {
    const int64_t layer = owner_layer(info.name, L);
    const bool in_first = layer < cut;
    Llama& owner = in_first ? first : second;
    Llama& other = in_first ? second : first;
    for (int64_t i = info.offset; i < info.offset + info.numel; ++i) {
      const auto at = static_cast<size_t>(i);
      ASSERT_TRUE(same_bits(owner.grads()[at], whole.grads()[at]))
          << info.name << " element " << i - info.offset;
      ASSERT_EQ(other.grads()[at], 0.0f) << info.name << " outside the stage";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cuts, LayerRangeTest,
                         ::testing::Values(std::pair<int64_t, bool>{1, false}, std::pair<int64_t, bool>{2, false},
                                           std::pair<int64_t, bool>{3, false}, std::pair<int64_t, bool>{2, true}),
                         [](const auto& info) {
                           return "cut" + std::to_string(info.param.first) + (info.param.second ? "_checkpoint" : "");
                         });

TEST(LayerRange, AnEmptyOrOutOfModelRangeIsRefused) {
  Llama model(tiny_qwen2(4));
  EXPECT_THROW(model.set_layer_range({2, 2}), Error);
  EXPECT_THROW(model.set_layer_range({-1, 2}), Error);
  EXPECT_THROW(model.set_layer_range({0, 5}), Error);
  model.set_layer_range({1, 4});
  EXPECT_EQ(model.layer_range().begin, 1);
}

// Records every hook call in order.
class RecordingContext final : public ParallelContext {
 public:
  std::vector<std::string> calls;
  std::vector<GradSpan> ready;
  void before_group_forward(ParamGroup g) override { calls.push_back("forward " + name(g)); }
  void before_group_backward(ParamGroup g) override { calls.push_back("backward " + name(g)); }
  void grad_ready(GradSpan s) override { ready.push_back(s); }

 private:
  static std::string name(ParamGroup g) {
    switch (g.kind) {
      case ParamGroup::Kind::embedding: return "embedding";
      case ParamGroup::Kind::head: return "head";
      case ParamGroup::Kind::block: return "block " + std::to_string(g.layer);
    }
    return "?";
  }
};

TEST(ParallelContext, HooksComeBeforeEachGroupIsUsedAndAfterItsGradientsAreFinal) {
  Rng rng(test_seed());
  ModelConfig cfg = tiny_qwen2(4);
  cfg.n_layers = 2;
  Llama model(cfg);
  fill(model, rng);
  RecordingContext context;
  model.set_parallel_context(&context);
  const std::vector<int32_t> tokens = random_tokens(rng, 8, cfg.vocab_size);
  const std::vector<int32_t> targets = random_tokens(rng, 8, cfg.vocab_size);
  model.zero_grads();
  model.forward(tokens.data(), targets.data(), 2, 4);
  model.backward(1.0f);
  const std::vector<std::string> expected = {"forward embedding", "forward block 0", "forward block 1", "forward head",
                                             "backward head",     "backward block 1", "backward block 0",
                                             "backward embedding"};
  EXPECT_EQ(context.calls, expected);
  // Every trainable range once, in the order the model announces, covering the arena.
  const std::vector<GradSpan> order = model.grad_ready_order();
  ASSERT_EQ(context.ready.size(), order.size());
  int64_t covered = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    EXPECT_EQ(context.ready[i].begin, order[i].begin);
    EXPECT_EQ(context.ready[i].end, order[i].end);
    covered += order[i].end - order[i].begin;
  }
  EXPECT_EQ(covered, static_cast<int64_t>(model.trainable().grads.size()));
  // Detached: no more calls.
  model.set_parallel_context(nullptr);
  context.calls.clear();
  model.forward(tokens.data(), targets.data(), 2, 4);
  EXPECT_TRUE(context.calls.empty());
}

}  // namespace
}  // namespace flotilla::model
