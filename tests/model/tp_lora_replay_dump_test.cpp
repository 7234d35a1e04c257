// Not a test: a tool, run by hand, that writes one draw of tensor_parallel_test.cpp's LoRA
// case (LoraOnEveryLayerGivesTheOneRankAdapterGradientSlices) for an exact replay: the
// model (a Hugging Face directory), the adapters (PEFT), the tokens, targets and LoRA dropout
// masks, and the adapter gradients of one rank and of the two tp ranks pasted whole.
// tests/reference/replay_tp_lora_float64.py then computes the exact (float64) gradients in
// PyTorch and how far float32 rounding of the inputs alone moves them (rounding_noise.hpp):
//   PROBE_DIR=/tmp/d FLOTILLA_TEST_SEED=12181650701941647467 build/tests/test_model \
//       --gtest_also_run_disabled_tests --gtest_filter='TpLoraReplay.*'
//   python3 tests/reference/replay_tp_lora_float64.py /tmp/d
// PROBE_TIED=1 and PROBE_SP=1 pick the other cases (tied embeddings, sequence parallelism).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/rng.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "../test_seed.hpp"
#include "random_model.hpp"
#include "thread_pair.hpp"
#include "tp_lora_step.hpp"

namespace flotilla::model {
namespace {

using test_models::ThreadPair;

TEST(TpLoraReplay, DISABLED_WritesOneDraw) {
  const char* out = std::getenv("PROBE_DIR");
  ASSERT_NE(out, nullptr) << "set PROBE_DIR to the folder to write";
  const bool tied = std::getenv("PROBE_TIED") != nullptr, sequence_parallel = std::getenv("PROBE_SP") != nullptr;
  namespace fs = std::filesystem;
  const fs::path dir(out);
  fs::create_directories(dir);
  const ModelConfig full_cfg = test_models::tiny_qwen2(2, tied);
  const uint64_t seed = ::flotilla::testing::test_seed();
  Rng rng(seed);
  Llama full(full_cfg);
  test_models::fill_order_one(full, rng);
  LoraConfig lc;
  lc.rank = 4;
  lc.dropout = 0.25f;
  lc.targets = LoraConfig::parse_targets("q,k,v,o,gate,up,down");
  LoraAdapters whole(full_cfg, lc);
  rng.fill_uniform(whole.params(), -0.5f, 0.5f);
  full.attach_lora(&whole);
  full.set_training(true);
  const int64_t B = sequence_parallel ? 3 : 2, T = sequence_parallel ? 5 : 8;
  const std::vector<int32_t> tokens = test_models::random_tokens(rng, B * T, full_cfg.vocab_size);
  const std::vector<int32_t> targets = test_models::random_tokens(rng, B * T, full_cfg.vocab_size);
  full.zero_grads();
  const LossSum expected = full.forward(tokens.data(), targets.data(), B, T);
  full.backward(1.0f / static_cast<float>(expected.num_tokens));
  const double expected_norm2 = full.grad_sum_squares_tensor_parallel();

  std::vector<Llama> locals;
  for (int r = 0; r < 2; ++r) {
    locals.emplace_back(tensor_parallel_config(full_cfg, {r, 2}));
    take_slices(locals.back(), full, {r, 2});
  }
  test_models::TpLoraStep step = test_models::run_tp_lora_step(locals, full_cfg, whole, lc, tokens.data(), targets.data(),
                                                               B, T, sequence_parallel, sequence_parallel && tied);
  const std::vector<std::unique_ptr<LoraAdapters>>& adapters = step.adapters;
  const LossSum* loss = step.loss;
  const double* norm2 = step.norm2;

  full.attach_lora(nullptr);
  full.save(dir / "model");
  whole.save_peft(dir / "adapter", "probe");
  LoraAdapters g1(full_cfg, lc), g2(full_cfg, lc);
  std::copy(whole.grads().begin(), whole.grads().end(), g1.params().begin());
  g1.save_peft(dir / "grad_one", "probe");
  for (const ParamInfo& info : whole.table().params())
    for (int r = 0; r < 2; ++r)
      copy_slice_in(info, *adapters[static_cast<size_t>(r)]->table().find(info.name), {r, 2},
                    adapters[static_cast<size_t>(r)]->grads(), g2.params());
  g2.save_peft(dir / "grad_tp", "probe");
  nlohmann::json j;
  j["tokens"] = tokens;
  j["targets"] = targets;
  j["B"] = B;
  j["T"] = T;
  j["loss_one"] = expected.sum;
  j["loss_tp"] = loss[0].sum;
  j["num_tokens"] = expected.num_tokens;
  j["norm2_one"] = expected_norm2;
  j["norm2_tp"] = norm2[0];
  j["scale"] = lc.scale();
  nlohmann::json masks = nlohmann::json::object();
  std::ofstream mf(dir / "masks.bin", std::ios::binary);
  int64_t at = 0;
  for (int64_t l = 0; l < full_cfg.n_layers; ++l)
    for (LoraTarget t : lc.targets) {
      const int64_t in = (t == LoraTarget::o) ? full_cfg.n_heads * full_cfg.head_dim
                         : (t == LoraTarget::down) ? full_cfg.ffn_dim : full_cfg.dim;
      std::vector<float> ones(static_cast<size_t>(B * T * in), 1.0f), m(ones.size());
      kernels::dropout_forward(m.data(), ones.data(), B * T * in, lc.dropout, lora_dropout_seed(0, l, t));
      mf.write(reinterpret_cast<const char*>(m.data()), static_cast<std::streamsize>(m.size() * 4));
      masks[std::to_string(l) + "." + std::string(lora_target_module(t))] = {at, in};
      at += B * T * in;
    }
  j["masks"] = masks;
  std::ofstream(dir / "meta.json") << j.dump(1);
}

}  // namespace
}  // namespace flotilla::model
