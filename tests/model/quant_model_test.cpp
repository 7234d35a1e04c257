// Quantized bases (MLX layout) as a specification: a quantized model computes what a float
// model holding its dequantized weights computes, stays close to the float model it came
// from, reads back from disk bit for bit, loads a directory laid out exactly as mlx_lm
// writes it, and trains LoRA adapters whose gradients match finite differences.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <map>
#include <array>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/model/decoder.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/model_writer.hpp"
#include "../test_seed.hpp"
#include "lora_check.hpp"
#include "../temp_dir.hpp"
#include "random_model.hpp"

namespace flotilla::model {
namespace {

using ::flotilla::testing::test_seed;
namespace fs = std::filesystem;

// Every input dimension (64, 96, q_dim 64) divides into groups of 32; GQA, untied head.
ModelConfig quant_config() {
  ModelConfig c;
  c.vocab_size = 40;
  c.dim = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_dim = 96;
  c.max_position = 64;
  c.initializer_range = 0.15f;  // logits of order one, so a wrong product shows
  return c;
}

using ::flotilla::testing::TempDir;

using test_models::random_tokens;

std::vector<float> eval_logits(Llama& m, const std::vector<int32_t>& tokens, int64_t B, int64_t T) {
  m.set_training(false);
  m.forward(tokens.data(), nullptr, B, T);
  return {m.logits().begin(), m.logits().end()};
}

// A float model holding the dequantized weights of `q`.
Llama dequantized_copy(const Llama& q) {
  ModelConfig cfg = q.config();
  cfg.quantization.reset();
  Llama f(cfg);
  for (const ParamInfo& info : f.layout().params())
    q.weight_f32(*q.layout().find(info.name), f.params().subspan(static_cast<size_t>(info.offset),
                                                                 static_cast<size_t>(info.numel)));
  return f;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, static_cast<double>(std::fabs(a[i] - b[i])));
  return m;
}

// B*T = 12 rows takes the tiled SGEMM path, the decoder's single rows the row path. Both
// compute each output as a length-C dot product with the same weights, in another order:
// float rounding of sums of ~100 terms of O(0.1) -> 1e-4 is ten times that noise.
TEST(QuantModel, ComputesWhatTheDequantizedFloatModelComputes) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  Llama model(quant_config());
  model.init_random(seed);
  for (int bits : {4, 8}) {
    Llama q = model.quantize({bits, 32}, DType::f16);
    EXPECT_TRUE(q.quantized());
    // No float space for quantized tensors: only the norms remain in the flat buffer.
    EXPECT_LE(q.params().size(), static_cast<size_t>(5 * 64 + 16 * 5));
    Llama f = dequantized_copy(q);
    const std::vector<int32_t> tokens = random_tokens(rng, 12, 40);
    const std::vector<float> lq = eval_logits(q, tokens, 2, 6), lf = eval_logits(f, tokens, 2, 6);
    EXPECT_LT(max_abs_diff(lq, lf), 1e-4) << bits << " bits";
    // The KV-cache decoder goes through the same linear layers.
    Decoder dec(q, 6);
    std::span<const float> last = dec.step(std::span<const int32_t>(tokens.data(), 6));
    for (int64_t v = 0; v < 40; ++v) EXPECT_NEAR(last[static_cast<size_t>(v)], lq[static_cast<size_t>(5 * 40 + v)], 1e-4);
  }
}

// Against the float model it came from, as a relative RMS error: rms(lq - l) / rms(l -
// mean(l)). Predicted: a group of 32 N(0, sigma) weights spans about 4.5 sigma, so the
// rounding error is uniform with RMS 4.5 sigma / (2^bits - 1) / sqrt(12), i.e. 0.51% of a
// weight at 8 bits and 8.7% at 4 bits. Each of the 16 quantized matrices on the path
// (embedding, 7 per layer, lm_head) adds that much relative noise, independently, to a
// random network's output: sqrt(16) x that = 2.0% and 35%, which is what is measured
// (1.5-2.9% and 26-35% over seeds). Bounds are twice the prediction; a wrong
// dequantization (bit order, scales and biases swapped) gives >= 100% (sqrt(2) for
// unrelated logits), and the 8-bit bound is what pins the arithmetic down.
TEST(QuantModel, LogitsCloseToTheFloatModel) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  Llama model(quant_config());
  model.init_random(seed);
  const std::vector<int32_t> tokens = random_tokens(rng, 16, 40);
  const std::vector<float> ref = eval_logits(model, tokens, 2, 8);
  double mean = 0.0;
  for (float x : ref) mean += x;
  mean /= static_cast<double>(ref.size());
  double ref_ss = 0.0;
  for (float x : ref) ref_ss += (x - mean) * (x - mean);
  for (const auto& [bits, bound] : {std::pair{8, 0.04}, std::pair{4, 0.7}}) {
    Llama q = model.quantize({bits, 32}, DType::f16);
    const std::vector<float> lq = eval_logits(q, tokens, 2, 8);
    double ss = 0.0;
    for (size_t i = 0; i < ref.size(); ++i) ss += (lq[i] - ref[i]) * (lq[i] - ref[i]);
    const double rel = std::sqrt(ss / ref_ss);
    std::printf("%d bits: relative RMS logit error %.2f%%\n", bits, 100.0 * rel);
    EXPECT_LT(rel, bound) << bits << " bits";
  }
}

// What convert writes (tensor by tensor, f16 scales) is what quantizing in memory gives,
// bit for bit: init_random's norms are 1, exact in f16, so nothing else differs.
TEST(QuantModel, WrittenDirectoryLoadsWithIdenticalLogits) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  Llama model(quant_config());
  model.init_random(seed);
  TempDir dir("written");
  ModelWriteOptions options;
  options.dtype = DType::f16;
  options.quantize = QuantFormat{4, 32};
  write_model(dir.path(), model.config(), options, [&](const ParamInfo& info, std::span<float> out) {
    model.weight_f32(*model.layout().find(info.name), out);
  });
  Llama loaded = Llama::load(dir.path());
  Llama in_memory = model.quantize({4, 32}, DType::f16);
  const std::vector<int32_t> tokens = random_tokens(rng, 10, 40);
  EXPECT_EQ(eval_logits(loaded, tokens, 1, 10), eval_logits(in_memory, tokens, 1, 10));
  // A streamed random init is init_random.
  TempDir init_dir("init");
  options.quantize.reset();
  options.dtype = DType::f32;
  write_model(init_dir.path(), model.config(), options, random_init_source(model.config(), seed));
  Llama init = Llama::load(init_dir.path());
  EXPECT_TRUE(std::equal(init.params().begin(), init.params().end(), model.params().begin()));
}

// ---- a directory written exactly as mlx_lm.convert -q writes one, built here by hand.

// MLX's affine quantizer (mlx/ops.cpp, affine_quantize): the larger-magnitude extreme is
// the edge, the scale is adjusted so that the edge is an exact level, 0 maps to a level.
void mlx_quantize_group(const float* w, int64_t gs, int bits, float& scale, float& bias, std::vector<uint32_t>& q) {
  const float n_bins = static_cast<float>((1 << bits) - 1);
  const auto [mn_it, mx_it] = std::minmax_element(w, w + gs);
  const float w_min = *mn_it, w_max = *mx_it;
  const bool mask = std::fabs(w_min) > std::fabs(w_max);
  scale = std::max((w_max - w_min) / n_bins, 1e-7f);
  scale = mask ? scale : -scale;
  const float edge = mask ? w_min : w_max;
  const float q0 = std::nearbyint(edge / scale);
  if (q0 != 0.0f) scale = edge / q0;
  bias = q0 == 0.0f ? 0.0f : edge;
  q.resize(static_cast<size_t>(gs));
  for (int64_t j = 0; j < gs; ++j)
    q[static_cast<size_t>(j)] = static_cast<uint32_t>(std::clamp(std::nearbyint((w[j] - bias) / scale), 0.0f, n_bins));
}

struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<char> bytes;
};

void write_raw_safetensors(const fs::path& path, const std::map<std::string, RawTensor>& tensors) {
  nlohmann::json header;
  header["__metadata__"] = {{"format", "mlx"}};
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  const std::string h = header.dump();
  const uint64_t n = h.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& [name, t] : tensors) out.write(t.bytes.data(), static_cast<std::streamsize>(t.bytes.size()));
}

template <typename T>
std::vector<char> as_bytes(const std::vector<T>& v) {
  std::vector<char> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

TEST(QuantModel, LoadsAnMlxLmDirectoryAsItIs) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  const ModelConfig cfg = quant_config();
  Llama source(cfg);
  source.init_random(seed);
  // The float model that the MLX directory means: f16 weights, dequantized in float.
  Llama expected(cfg);
  // Mixed quantization as newer mlx_lm writes it: one module float, one at 8 bits / 32.
  const std::string float_module = "model.layers.1.mlp.down_proj";
  const std::string wide_module = "model.layers.0.self_attn.v_proj";
  std::map<std::string, RawTensor> tensors;
  for (const ParamInfo& info : source.layout().params()) {
    const float* w = source.params().data() + info.offset;
    float* e = expected.params().data() + info.offset;
    const std::string module = info.name.substr(0, info.name.size() - 7);
    const int bits = module == wide_module ? 8 : 4;
    const int64_t gs = module == wide_module ? 32 : 64;
    // mlx_lm leaves float what its config marks false and what does not divide into groups
    // (down_proj's 96 inputs here).
    if (info.shape.size() != 2 || module == float_module || info.shape[1] % gs != 0) {
      std::vector<uint16_t> h(static_cast<size_t>(info.numel));
      for (int64_t i = 0; i < info.numel; ++i) {
        h[static_cast<size_t>(i)] = f32_to_f16(w[i]);
        e[i] = f16_to_f32(h[static_cast<size_t>(i)]);
      }
      tensors[info.name] = {"F16", info.shape, as_bytes(h)};
      continue;
    }
    const int64_t rows = info.shape[0], cols = info.shape[1], per_word = 32 / bits;
    std::vector<uint32_t> packed(static_cast<size_t>(rows * cols / per_word), 0u);
    std::vector<uint16_t> scales(static_cast<size_t>(rows * cols / gs)), biases(scales.size());
    std::vector<uint32_t> q;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < cols / gs; ++g) {
        float s, b;
        mlx_quantize_group(w + r * cols + g * gs, gs, bits, s, b, q);
        const size_t gi = static_cast<size_t>(r * (cols / gs) + g);
        scales[gi] = f32_to_f16(s);
        biases[gi] = f32_to_f16(b);
        for (int64_t j = 0; j < gs; ++j) {
          const int64_t col = g * gs + j;
          packed[static_cast<size_t>((r * cols + col) / per_word)] |= q[static_cast<size_t>(j)]
                                                                      << ((col % per_word) * bits);
          e[r * cols + col] = f16_to_f32(scales[gi]) * static_cast<float>(q[static_cast<size_t>(j)]) + f16_to_f32(biases[gi]);
        }
      }
    }
    tensors[info.name] = {"U32", {rows, cols / per_word}, as_bytes(packed)};
    tensors[module + ".scales"] = {"F16", {rows, cols / gs}, as_bytes(scales)};
    tensors[module + ".biases"] = {"F16", {rows, cols / gs}, as_bytes(biases)};
  }
  TempDir dir("mlx");
  write_raw_safetensors(dir.path() / "model.safetensors", tensors);
  nlohmann::json config = cfg.to_json();
  config["torch_dtype"] = "float16";
  const nlohmann::json q = {{"group_size", 64}, {"bits", 4}, {float_module, false},
                            {wide_module, {{"group_size", 32}, {"bits", 8}}}};
  config["quantization"] = q;
  config["quantization_config"] = q;
  std::ofstream(dir.path() / "config.json") << config.dump(2);

  Llama loaded = Llama::load(dir.path());
  EXPECT_TRUE(loaded.quantized());
  EXPECT_FALSE(loaded.layout().find(float_module + ".weight")->quantized);
  const std::vector<int32_t> tokens = random_tokens(rng, 12, cfg.vocab_size);
  // Same weights, blockwise vs whole GEMM: float rounding only (see above).
  EXPECT_LT(max_abs_diff(eval_logits(loaded, tokens, 2, 6), eval_logits(expected, tokens, 2, 6)), 1e-4);
}

// One (rows, cols) float matrix as mlx_lm stores it quantized: packed U32 words, F16 scales
// and biases (bits, group size gs).
struct MlxQuantized {
  std::vector<uint32_t> packed;
  std::vector<uint16_t> scales, biases;
};
MlxQuantized mlx_quantize(const float* w, int64_t rows, int64_t cols, int bits, int64_t gs) {
  const int64_t per_word = 32 / bits;
  MlxQuantized m;
  m.packed.assign(static_cast<size_t>(rows * cols / per_word), 0u);
  m.scales.resize(static_cast<size_t>(rows * cols / gs));
  m.biases.resize(m.scales.size());
  std::vector<uint32_t> q;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < cols / gs; ++g) {
      float scale, bias;
      mlx_quantize_group(w + r * cols + g * gs, gs, bits, scale, bias, q);
      const size_t gi = static_cast<size_t>(r * (cols / gs) + g);
      m.scales[gi] = f32_to_f16(scale);
      m.biases[gi] = f32_to_f16(bias);
      for (int64_t j = 0; j < gs; ++j) {
        const int64_t col = g * gs + j;
        m.packed[static_cast<size_t>((r * cols + col) / per_word)] |= q[static_cast<size_t>(j)]
                                                                     << ((col % per_word) * bits);
      }
    }
  return m;
}

template <typename T>
void append(std::vector<char>& to, const std::vector<T>& v) {
  const std::vector<char> b = as_bytes(v);
  to.insert(to.end(), b.begin(), b.end());
}

// mlx_lm's name of the stacked module an expert's weight belongs to
// ("model.layers.1.block_sparse_moe.experts.2.w1.weight" ->
// "model.layers.1.block_sparse_moe.switch_mlp.gate_proj"); "" for other tensors.
std::string switch_mlp_of(const std::string& name) {
  const size_t at = name.find(".experts.");
  if (at == std::string::npos) return "";
  const std::string tail = name.substr(name.find('.', at + 9) + 1);
  const std::map<std::string, std::string> proj = {{"w1.weight", "gate_proj"},        {"w3.weight", "up_proj"},
                                                   {"w2.weight", "down_proj"},        {"gate_proj.weight", "gate_proj"},
                                                   {"up_proj.weight", "up_proj"},     {"down_proj.weight", "down_proj"}};
  return name.substr(0, at) + ".switch_mlp." + proj.at(tail);
}

ModelConfig small_moe(Architecture arch) {
  ModelConfig c = quant_config();
  c.arch = arch;
  c.ffn_dim = 64;
  c.moe.num_experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_ffn_dim = 64;
  c.moe.router_aux_loss_coef = 0.02f;
  c.moe.output_router_logits = true;
  c.moe.norm_topk_prob = arch == Architecture::mixtral;
  if (arch == Architecture::qwen2_moe) {
    c.qkv_bias = true;
    c.moe.shared_expert_ffn_dim = 64;
    c.moe.mlp_only_layers = {0};
  }
  return c;
}

// A 4-bit directory of `source`'s weights, its experts one tensor each (per_expert) or
// stacked per projection as mlx_lm's SwitchGLU holds them (...switch_mlp.gate_proj.weight
// (E, out, in / 8), .scales and .biases (E, out, in / 64)); `drop_last_expert` leaves the
// last expert out of every stack.
void write_mlx_moe(const fs::path& dir, const Llama& source, bool per_expert, bool drop_last_expert = false) {
  const ModelConfig& cfg = source.config();
  std::map<std::string, RawTensor> tensors;
  std::map<std::string, std::array<RawTensor, 3>> stacks;
  for (const ParamInfo& info : source.layout().params()) {
    const float* w = source.params().data() + info.offset;
    if (info.shape.size() != 2) {
      std::vector<uint16_t> h(static_cast<size_t>(info.numel));
      for (int64_t i = 0; i < info.numel; ++i) h[static_cast<size_t>(i)] = f32_to_f16(w[i]);
      tensors[info.name] = {"F16", info.shape, as_bytes(h)};
      continue;
    }
    const int64_t rows = info.shape[0], cols = info.shape[1];
    const MlxQuantized q = mlx_quantize(w, rows, cols, 4, 64);
    const std::string stack = per_expert ? "" : switch_mlp_of(info.name);
    if (stack.empty()) {
      const std::string module = info.name.substr(0, info.name.size() - 7);
      tensors[info.name] = {"U32", {rows, cols / 8}, as_bytes(q.packed)};
      tensors[module + ".scales"] = {"F16", {rows, cols / 64}, as_bytes(q.scales)};
      tensors[module + ".biases"] = {"F16", {rows, cols / 64}, as_bytes(q.biases)};
      continue;
    }
    if (drop_last_expert && expert_of_tensor(info.name) == cfg.moe.num_experts - 1) continue;
    const int64_t E = cfg.moe.num_experts - (drop_last_expert ? 1 : 0);
    auto& [sw, ss, sb] = stacks[stack];
    sw.dtype = "U32";
    sw.shape = {E, rows, cols / 8};
    ss.dtype = sb.dtype = "F16";
    ss.shape = sb.shape = {E, rows, cols / 64};
    append(sw.bytes, q.packed);
    append(ss.bytes, q.scales);
    append(sb.bytes, q.biases);
  }
  for (auto& [module, parts] : stacks) {
    tensors[module + ".weight"] = parts[0];
    tensors[module + ".scales"] = parts[1];
    tensors[module + ".biases"] = parts[2];
  }
  fs::create_directories(dir);
  write_raw_safetensors(dir / "model.safetensors", tensors);
  nlohmann::json config = cfg.to_json();
  config["quantization"] = {{"group_size", 64}, {"bits", 4}};
  std::ofstream(dir / "config.json") << config.dump(2);
}

// mlx-community's MoE checkpoints stack each projection's experts (switch_mlp). Loaded, they
// are the same weights as the experts one by one (logits bit for bit), compute what the
// float model of their dequantized weights computes (1e-4, as above), and take LoRA
// adapters on the experts (adapted logits as over that float model). A stack short of an
// expert is one error naming the tensor.
TEST(QuantModel, LoadsMlxLmStackedExperts) {
  const uint64_t seed = test_seed();
  for (Architecture arch : {Architecture::mixtral, Architecture::qwen2_moe}) {
    SCOPED_TRACE(architecture_name(arch));
    Rng rng(seed);
    const ModelConfig cfg = small_moe(arch);
    Llama source(cfg);
    source.init_random(seed);
    TempDir stacked("moe_stacked"), one_by_one("moe_experts"), short_stack("moe_short");
    write_mlx_moe(stacked.path(), source, false);
    write_mlx_moe(one_by_one.path(), source, true);
    Llama from_stack = Llama::load(stacked.path());
    Llama from_experts = Llama::load(one_by_one.path());
    EXPECT_TRUE(from_stack.quantized());
    const std::vector<int32_t> tokens = random_tokens(rng, 12, cfg.vocab_size);
    const std::vector<float> logits = eval_logits(from_stack, tokens, 2, 6);
    EXPECT_EQ(logits, eval_logits(from_experts, tokens, 2, 6));
    Llama expected = dequantized_copy(from_stack);
    EXPECT_LT(max_abs_diff(logits, eval_logits(expected, tokens, 2, 6)), 1e-4);

    LoraConfig lc;
    lc.rank = 4;
    lc.targets = LoraConfig::parse_targets(arch == Architecture::mixtral ? "q,w1,w2,w3" : "q,gate,up,down");
    LoraAdapters lora(cfg, lc);
    lora_check::randomize(lora, seed);
    from_stack.attach_lora(&lora);
    expected.attach_lora(&lora);
    const std::vector<float> adapted = eval_logits(from_stack, tokens, 2, 6);
    EXPECT_LT(max_abs_diff(adapted, eval_logits(expected, tokens, 2, 6)), 1e-4);
    EXPECT_GT(max_abs_diff(adapted, logits), 1e-3) << "the adapters changed nothing: the check proves nothing";

    write_mlx_moe(short_stack.path(), source, false, /*drop_last_expert=*/true);
    const std::string block = arch == Architecture::mixtral ? "block_sparse_moe" : "mlp";
    try {
      Llama::load(short_stack.path());
      ADD_FAILURE() << "a stack of 3 of 4 experts loaded";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("." + block + ".switch_mlp."), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("leading dimension of 4"), std::string::npos) << e.what();
    }
  }
}

// What convert --quantize writes of an MoE model is mlx_lm's stacked layout (a
// switch_mlp module per projection, no per-expert tensor), and loading it gives, matrix by
// matrix, the bytes of quantizing in memory; written back to float (convert without
// --quantize) it is the experts one by one, each the dequantized matrix bit for bit.
TEST(QuantModel, ConvertWritesMoeExpertsStackedAndReadsThemBack) {
  const uint64_t seed = test_seed();
  for (Architecture arch : {Architecture::mixtral, Architecture::qwen2_moe}) {
    SCOPED_TRACE(architecture_name(arch));
    Llama model(small_moe(arch));
    model.init_random(seed);
    auto from = [](const Llama& m) {
      return [&m](const ParamInfo& info, std::span<float> out) { m.weight_f32(*m.layout().find(info.name), out); };
    };
    TempDir dir("moe_written"), back("moe_float");
    ModelWriteOptions options;
    options.dtype = DType::f16;
    options.quantize = QuantFormat{4, 32};
    write_model(dir.path(), model.config(), options, from(model));
    const std::string block = arch == Architecture::mixtral ? "block_sparse_moe" : "mlp";
    {
      const io::SafetensorsFile file(dir.path() / "model.safetensors");
      const io::TensorEntry* stack = file.find("model.layers.1." + block + ".switch_mlp.down_proj.weight");
      ASSERT_NE(stack, nullptr);
      EXPECT_EQ(stack->shape, (std::vector<int64_t>{4, 64, 64 / 8}));
      EXPECT_EQ(file.find("model.layers.1." + block + ".experts.0." +
                          (arch == Architecture::mixtral ? "w2" : "down_proj") + ".weight"),
                nullptr);
    }
    const Llama loaded = Llama::load(dir.path());
    const Llama in_memory = model.quantize({4, 32}, DType::f16);
    int compared = 0;
    for (const ParamInfo& info : in_memory.layout().params()) {
      if (!info.quantized) continue;
      const QuantMatrix& a = in_memory.quantized_weight(info.ref());
      const QuantMatrix& b = loaded.quantized_weight(loaded.layout().find(info.name)->ref());
      ASSERT_EQ(a.bytes(), b.bytes()) << info.name;
      const size_t words = static_cast<size_t>(a.rows * a.words_per_row()) * 4;
      const size_t groups = static_cast<size_t>(a.rows * a.groups_per_row()) * 2;
      EXPECT_EQ(std::memcmp(a.packed, b.packed, words), 0) << info.name;
      EXPECT_EQ(std::memcmp(a.scales, b.scales, groups), 0) << info.name;
      EXPECT_EQ(std::memcmp(a.biases, b.biases, groups), 0) << info.name;
      ++compared;
    }
    EXPECT_GT(compared, 3 * 4);
    ModelWriteOptions to_float;
    to_float.dtype = DType::f32;
    write_model(back.path(), loaded.config(), to_float, from(loaded));
    const Llama dequantized = Llama::load(back.path());
    EXPECT_FALSE(dequantized.quantized());
    for (const ParamInfo& info : dequantized.layout().params()) {
      std::vector<float> want(static_cast<size_t>(info.numel));
      loaded.weight_f32(*loaded.layout().find(info.name), want);
      const auto got = std::as_const(dequantized).params().subspan(static_cast<size_t>(info.offset), want.size());
      ASSERT_TRUE(std::equal(want.begin(), want.end(), got.begin())) << info.name;
    }
  }
}

TEST(QuantModel, LoraGradientsThroughAQuantizedBaseMatchFiniteDifferences) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  Llama base(quant_config());
  base.init_random(seed);
  Llama model = base.quantize({4, 32}, DType::f16);
  LoraAdapters lora(model.config(), lora_check::all_targets(2));
  lora_check::randomize(lora, seed);
  model.attach_lora(&lora);
  const int64_t B = 2, T = 5;
  const std::vector<int32_t> tokens = random_tokens(rng, B * T, 40), targets = random_tokens(rng, B * T, 40);
  // As in lora_test; a missing input gradient through a quantized layer changes the A
  // gradients by O(1).
  EXPECT_EQ(lora_check::expect_grads_match_finite_differences(model, lora, tokens, targets, B, T, rng), 3 * 2 * 7 * 2);
}

// Gradient checkpointing over a quantized base, LoRA dropout on, two micro-batches
// accumulated: each block is recomputed through the same packed kernels with the same
// dropout masks, so the adapter gradients are bit for bit those of stored activations.
TEST(QuantModel, GradCheckpointOverAQuantizedBaseGivesTheSameAccumulatedGradients) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  ModelConfig cfg = quant_config();
  cfg.n_layers = 3;
  Llama base(cfg);
  base.init_random(seed);
  Llama model = base.quantize({4, 32}, DType::f16);
  LoraAdapters lora(model.config(), lora_check::all_targets(2, 0.25f));
  lora_check::randomize(lora, seed);
  model.attach_lora(&lora);
  const int64_t B = 2, T = 5;
  std::vector<std::vector<int32_t>> tokens, targets;
  for (int m = 0; m < 2; ++m) {
    tokens.push_back(random_tokens(rng, B * T, 40));
    targets.push_back(random_tokens(rng, B * T, 40));
  }
  const auto grads_of = [&](bool checkpoint) {
    model.set_grad_checkpoint(checkpoint);
    model.set_dropout_step(11);
    model.zero_grads();
    for (int m = 0; m < 2; ++m) {
      const LossSum l = model.forward(tokens[m].data(), targets[m].data(), B, T);
      model.backward(1.0f / static_cast<float>(l.num_tokens));
    }
    return std::vector<float>(lora.grads().begin(), lora.grads().end());
  };
  lora_check::expect_grad_checkpoint_changes_no_bit(grads_of);
  EXPECT_LT(model.activation_bytes(B, T), Llama::activation_bytes(model.config(), &lora, B, T, false));
}

// generate --adapter over a quantized base: the decoder runs the adapters alongside the
// packed layers and gets what the training forward with attached adapters gets (float
// rounding of differently ordered sums: 1e-4 as above).
TEST(QuantModel, DecoderAppliesAdaptersOverAQuantizedBase) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  Llama base(quant_config());
  base.init_random(seed);
  Llama model = base.quantize({4, 32}, DType::f16);
  LoraConfig lc;
  lc.targets = LoraConfig::parse_targets("q,k,v,o,gate,up,down");
  LoraAdapters lora(model.config(), lc);
  lora.init_random(seed);
  Rng brng(seed + 1);
  brng.fill_uniform(lora.params(), -0.3f, 0.3f);  // B != 0, so the adapters matter
  const std::vector<int32_t> tokens = random_tokens(rng, 7, 40);
  Decoder plain(model, 7), adapted(model, 7, &lora);
  const std::span<const float> p = plain.step(tokens);
  const std::vector<float> without(p.begin(), p.end());
  const std::span<const float> last = adapted.step(tokens);
  model.attach_lora(&lora);
  const std::vector<float> ref = eval_logits(model, tokens, 1, 7);
  double changed = 0.0;
  for (int64_t v = 0; v < 40; ++v) {
    EXPECT_NEAR(last[static_cast<size_t>(v)], ref[static_cast<size_t>(6 * 40 + v)], 1e-4);
    changed = std::max(changed, static_cast<double>(std::fabs(last[static_cast<size_t>(v)] - without[static_cast<size_t>(v)])));
  }
  EXPECT_GT(changed, 1e-2);
}

TEST(QuantModel, FullFineTuningOfAQuantizedModelIsRefused) {
  Llama base(quant_config());
  base.init_random(1);
  Llama q = base.quantize({4, 32}, DType::f16);
  EXPECT_THROW(q.trainable(), InputError);
  const std::vector<int32_t> tokens = {1, 2, 3};
  q.forward(tokens.data(), tokens.data(), 1, 3);
  EXPECT_THROW(q.backward(1.0f), InputError);
}

TEST(QuantModel, FormatsThatQuantizeNothingAreAnInputError) {
  EXPECT_THROW(plan_quantization(quant_config(), {4, 128}), InputError);  // divides neither 64 nor 96
  EXPECT_THROW(plan_quantization(quant_config(), {4, 12}), InputError);   // not whole words
  EXPECT_THROW(plan_quantization(quant_config(), {3, 32}), InputError);   // 3 bits
}

// As mlx_lm's quantize predicate (weight.shape[-1] % group_size): a layer whose input
// dimension the group size does not divide stays float, is named, and the model written
// that way loads back mixed with the logits of the same quantization done in memory.
TEST(QuantModel, LayersTheGroupSizeDoesNotDivideStayFloatAndAreNamed) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  Llama model(quant_config());  // hidden 64, intermediate 96: group size 48 divides only down_proj's 96
  model.init_random(seed);
  const QuantFormat f{4, 48};
  const QuantizationPlan plan = plan_quantization(model.config(), f);
  EXPECT_EQ(plan.quantized, (std::set<std::string>{"model.layers.0.mlp.down_proj.weight",
                                                   "model.layers.1.mlp.down_proj.weight"}));
  ASSERT_EQ(plan.left_float.size(), 2u + 2u * 6u);  // embeddings, lm_head; q,k,v,o,gate,up per layer
  EXPECT_EQ(plan.left_float.front(), "model.embed_tokens");
  EXPECT_EQ(describe_left_float(plan),
            "input dimension 64: model.embed_tokens, model.layers.{0..1}.self_attn.q_proj, "
            "model.layers.{0..1}.self_attn.k_proj, model.layers.{0..1}.self_attn.v_proj, "
            "model.layers.{0..1}.self_attn.o_proj, model.layers.{0..1}.mlp.gate_proj, "
            "model.layers.{0..1}.mlp.up_proj, lm_head");

  TempDir dir("mixed");
  ModelWriteOptions options;
  options.dtype = DType::f16;
  options.quantize = f;
  write_model(dir.path(), model.config(), options, [&](const ParamInfo& info, std::span<float> out) {
    model.weight_f32(*model.layout().find(info.name), out);
  });
  std::ifstream config_file(dir.path() / "config.json");
  const nlohmann::json q = nlohmann::json::parse(config_file)["quantization"];
  EXPECT_EQ(q["group_size"], 48);
  EXPECT_EQ(q["model.layers.1.mlp.up_proj"], false);  // mlx_lm's per-module "stays float"
  EXPECT_FALSE(q.contains("model.layers.1.mlp.down_proj"));
  Llama loaded = Llama::load(dir.path());
  EXPECT_TRUE(loaded.layout().find("model.layers.1.mlp.down_proj.weight")->quantized);
  EXPECT_FALSE(loaded.layout().find("model.layers.1.mlp.up_proj.weight")->quantized);
  Llama in_memory = model.quantize(f, DType::f16);
  const std::vector<int32_t> tokens = random_tokens(rng, 10, 40);
  // The float layers are f16 on disk and f32 in memory: rounding of order 1e-3 relative.
  EXPECT_LT(max_abs_diff(eval_logits(loaded, tokens, 1, 10), eval_logits(in_memory, tokens, 1, 10)), 2e-2);
}

}  // namespace
}  // namespace flotilla::model
