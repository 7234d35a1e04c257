// LoRA adapters: gradients against finite differences, a frozen base that keeps no
// gradient, dropout masks that backward reproduces, merging, and PEFT's file layout.
#include "flotilla/model/lora.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"
#include "lora_check.hpp"

namespace flotilla::model {
namespace {

uint64_t fresh_seed() { return ::flotilla::testing::test_seed(); }

ModelConfig lora_config() {
  ModelConfig cfg;
  cfg.vocab_size = 29;
  cfg.dim = 16;
  cfg.n_layers = 3;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 4;
  cfg.ffn_dim = 24;
  cfg.qkv_bias = true;
  cfg.initializer_range = 0.3f;
  return cfg;
}

using lora_check::all_targets;
using lora_check::randomize;

struct LoraBatch {
  std::vector<int32_t> tokens, targets;
};
LoraBatch random_batch(Rng& rng, int64_t n, int64_t vocab) {
  LoraBatch b;
  for (int64_t i = 0; i < n; ++i) {
    b.tokens.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    b.targets.push_back(i % 5 == 4 ? kIgnoreIndex : static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  }
  return b;
}

// The small model with random adapters (nonzero B) attached, both from one seed; rng goes
// on from that seed for the test's batches and samples.
struct AdaptedModel {
  AdaptedModel(const LoraConfig& cfg, uint64_t seed) : rng(seed), model(lora_config()), lora(model.config(), cfg) {
    model.init_random(seed);
    randomize(lora, seed);
    model.attach_lora(&lora);
  }
  AdaptedModel(const AdaptedModel&) = delete;
  AdaptedModel& operator=(const AdaptedModel&) = delete;

  Rng rng;
  Llama model;
  LoraAdapters lora;
};

TEST(Lora, AdapterGradientsMatchFiniteDifferences) {
  AdaptedModel setup(all_targets(2), fresh_seed());
  auto& [rng, model, lora] = setup;
  const int64_t B = 2, T = 5;
  const LoraBatch batch = random_batch(rng, B * T, 29);
  const int checked =
      lora_check::expect_grads_match_finite_differences(model, lora, batch.tokens, batch.targets, B, T, rng);
  EXPECT_EQ(checked, 3 * 2 * 7 * 2);  // 3 samples x (A, B) x 7 targets x 2 layers
}

TEST(Lora, AdapterGradientsMatchFiniteDifferencesWhenSomeProjectionsHaveNone) {
  // Backward recomputes a product's input (SwiGLU's output for down, the MLP's norm for
  // gate and up) only where a gradient or an adapter reads it: these target sets skip one
  // or both, and every adapter's gradients must stay right.
  for (const char* targets : {"q,k,v,o", "up", "down"}) {
    SCOPED_TRACE(targets);
    LoraConfig cfg = all_targets(2);
    cfg.targets = LoraConfig::parse_targets(targets);
    AdaptedModel setup(cfg, fresh_seed());
    auto& [rng, model, lora] = setup;
    const int64_t B = 2, T = 5;
    const LoraBatch batch = random_batch(rng, B * T, 29);
    EXPECT_GT(lora_check::expect_grads_match_finite_differences(model, lora, batch.tokens, batch.targets, B, T, rng),
              0);
  }
}

TEST(Lora, FrozenBaseKeepsNoGradientAndStaysUnchanged) {
  Llama model(lora_config());
  model.init_random(1);
  LoraAdapters lora(model.config(), all_targets(1));
  lora.init_random(2);
  model.attach_lora(&lora);
  const std::vector<float> base(model.params().begin(), model.params().end());
  Rng rng(3);
  const LoraBatch batch = random_batch(rng, 8, 29);
  model.zero_grads();
  model.forward(batch.tokens.data(), batch.targets.data(), 1, 8);
  model.backward(1.0f);
  EXPECT_FALSE(model.base_grads_allocated());
  EXPECT_EQ(model.trainable().params.size(), lora.params().size());
  EXPECT_TRUE(std::equal(base.begin(), base.end(), model.params().begin()));
  // B = 0 at init, so dB carries the signal and dA is exactly zero.
  double dB = 0.0;
  for (const ParamInfo& info : lora.table().params())
    if (info.name.find("lora_B") != std::string::npos)
      for (int64_t i = 0; i < info.numel; ++i) dB += std::fabs(lora.grads()[static_cast<size_t>(info.offset + i)]);
  EXPECT_GT(dB, 0.0);
}

// With adapters on the last two of three layers and dropout on, checkpointing recomputes
// each adapted block (masks included) and gives bit for bit the stored run's gradients.
TEST(Lora, GradCheckpointGivesTheSameAdapterGradients) {
  AdaptedModel setup(all_targets(2, 0.2f), fresh_seed());
  auto& [rng, model, lora] = setup;
  const LoraBatch batch = random_batch(rng, 12, 29);
  const auto grads_of = [&](bool checkpoint) {
    model.set_grad_checkpoint(checkpoint);
    model.set_dropout_step(5);
    model.zero_grads();
    const LossSum loss = model.forward(batch.tokens.data(), batch.targets.data(), 2, 6);
    model.backward(1.0f / static_cast<float>(loss.num_tokens));
    return std::vector<float>(lora.grads().begin(), lora.grads().end());
  };
  lora_check::expect_grad_checkpoint_changes_no_bit(grads_of);
  EXPECT_LT(model.activation_bytes(2, 6), Llama::activation_bytes(model.config(), &lora, 2, 6, false));
}

TEST(Lora, DropoutMaskIsReproducedInBackward) {
  AdaptedModel setup(all_targets(1, 0.3f), fresh_seed());
  auto& [rng, model, lora] = setup;
  const LoraBatch batch = random_batch(rng, 10, 29);
  // The same dropout step gives the same mask: finite differences see the mask backward uses.
  lora_check::expect_grads_match_finite_differences(model, lora, batch.tokens, batch.targets, 2, 5, rng, 1,
                                                    [&] { model.set_dropout_step(7); });
  // Dropout is on in training and off in evaluation; successive steps draw new masks.
  model.set_dropout_step(7);
  const double train_a = model.forward(batch.tokens.data(), batch.targets.data(), 2, 5).sum;
  const double train_b = model.forward(batch.tokens.data(), batch.targets.data(), 2, 5).sum;
  model.set_training(false);
  const double eval = model.forward(batch.tokens.data(), batch.targets.data(), 2, 5).sum;
  EXPECT_NE(train_a, train_b);
  EXPECT_NE(train_a, eval);
}

TEST(Lora, MergedModelComputesWhatBasePlusAdaptersCompute) {
  AdaptedModel setup(all_targets(2), fresh_seed());
  auto& [rng, model, lora] = setup;
  model.set_training(false);
  const LoraBatch batch = random_batch(rng, 12, 29);
  model.forward(batch.tokens.data(), nullptr, 2, 6);
  const std::vector<float> adapted(model.logits().begin(), model.logits().end());
  model.attach_lora(nullptr);
  model.forward(batch.tokens.data(), nullptr, 2, 6);
  const std::vector<float> base(model.logits().begin(), model.logits().end());
  lora.merge_into(model.params(), model.layout());
  model.forward(batch.tokens.data(), nullptr, 2, 6);
  double diff_base = 0.0;
  for (size_t i = 0; i < adapted.size(); ++i) {
    EXPECT_NEAR(model.logits()[i], adapted[i], 1e-4 * (1.0 + std::fabs(adapted[i])));
    diff_base = std::max(diff_base, static_cast<double>(std::fabs(base[i] - adapted[i])));
  }
  EXPECT_GT(diff_base, 1e-2) << "the adapters changed nothing: the comparison proves nothing";
}

TEST(Lora, PeftRoundTripAndLayout) {
  Llama model(lora_config());
  LoraConfig cfg = all_targets(2);
  cfg.targets = LoraConfig::parse_targets("q,v,down");
  LoraAdapters lora(model.config(), cfg);
  randomize(lora, 11);
  const auto dir = std::filesystem::temp_directory_path() / ("flotilla_lora_" + std::to_string(fresh_seed()));
  lora.save_peft(dir, "base-model");
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(dir / "adapter_config.json"));
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["r"], 3);
  EXPECT_EQ(j["target_modules"], nlohmann::json({"q_proj", "v_proj", "down_proj"}));
  EXPECT_EQ(j["layers_to_transform"], nlohmann::json({1, 2}));
  const io::SafetensorsFile file(dir / "adapter_model.safetensors");
  const io::TensorEntry& a = file.at("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{3, 16}));
  const io::TensorEntry& b = file.at("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
  EXPECT_EQ(b.shape, (std::vector<int64_t>{16, 3}));
  EXPECT_EQ(file.find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), nullptr);
  const LoraAdapters loaded = LoraAdapters::load_peft(dir, model.config());
  EXPECT_TRUE(std::equal(lora.params().begin(), lora.params().end(), loaded.params().begin()));
  EXPECT_EQ(loaded.first_layer(), 1);

  // A rank that does not match the tensors is an error naming the file.
  nlohmann::json bad = j;
  bad["r"] = 4;
  std::ofstream(dir / "adapter_config.json") << bad.dump();
  try {
    LoraAdapters::load_peft(dir, model.config());
    ADD_FAILURE() << "a wrong rank was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("adapter_model.safetensors"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(Lora, RejectsBadSettings) {
  const ModelConfig cfg = lora_config();
  LoraConfig c = all_targets(4);  // the model has 3 layers
  EXPECT_THROW(LoraAdapters(cfg, c), InputError);
  EXPECT_THROW(LoraConfig::parse_targets("q,x"), InputError);
  c = all_targets(1);
  c.rank = 0;
  EXPECT_THROW(LoraAdapters(cfg, c), InputError);
}

}  // namespace
}  // namespace flotilla::model
