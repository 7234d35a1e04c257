// LoRA: low-rank adapters on a frozen base (Hu et al. 2021), as PEFT and mlx_lm train them.
// An adapted linear layer computes
//     y = x W^T + b + scale * (dropout(x) A^T) B^T,   scale = alpha / rank,
// with A (rank, in) and B (out, rank); B starts at zero so training starts from the base.
// Only A and B are trained: they live in their own flat buffer, with their own gradients
// and optimizer state, and the base model keeps no gradient at all.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/buffer.hpp"
#include "flotilla/io/non_finite.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/params.hpp"

namespace flotilla::model {

class TensorParallelGroup;

// The layers LoRA adapts, by the module names of transformers' models. In a
// mixture-of-experts layer (docs/moe.md) the MLP targets reach every expert, each with its
// own adapter pair, as PEFT's target_modules matching on module names does:
// - Mixtral: w1 (gate), w3 (up), w2 (down) of block_sparse_moe.experts.{e}; its layers have
//   no gate_proj / up_proj / down_proj;
// - Qwen2-MoE: gate, up, down adapt mlp.experts.{e}.*_proj and the shared expert's
//   mlp.shared_expert.*_proj alike (and a dense layer's mlp.*_proj).
enum class LoraTarget : uint8_t { q, k, v, o, gate, up, down, w1, w2, w3 };
inline constexpr int kNumLoraTargets = 10;
std::string_view lora_target_module(LoraTarget t);  // "q_proj", ..., "down_proj", "w1", "w2", "w3"

// One of an expert's three projections (model::ExpertParams): gate (Fe, C), up (Fe, C),
// down (C, Fe).
enum class ExpertProj : uint8_t { gate, up, down };
inline constexpr int kNumExpertProjs = 3;

struct LoraConfig {
  int64_t rank = 8;
  float alpha = 16.0f;
  float dropout = 0.0f;
  std::vector<LoraTarget> targets = {LoraTarget::q, LoraTarget::v};
  int64_t num_layers = -1;  // adapt the last N layers (mlx_lm's --num-layers); -1: all

  float scale() const { return alpha / static_cast<float>(rank); }
  // "q,k,v,o,gate,up,down,w1,w2,w3" (any subset; also accepts q_proj etc.). InputError
  // otherwise. Whether the model has those layers is checked by LoraAdapters.
  static std::vector<LoraTarget> parse_targets(std::string_view list);
};

// Where one adapted linear layer's A and B sit in the adapter buffer.
struct LoraSlot {
  int64_t a = -1;  // (rank, in)
  int64_t b = -1;  // (out, rank)
  int64_t in = 0, out = 0;
  bool active() const { return a >= 0; }
};

// The seed of LoRA dropout's mask for one (training forward, layer, target): a fresh draw
// every step, the same one again in that step's backward.
inline uint64_t lora_dropout_seed(uint64_t forward_step, int64_t layer, LoraTarget t) {
  return (forward_step * 1000003ULL + static_cast<uint64_t>(layer)) * 8ULL + static_cast<uint64_t>(t) +
         0x5851f42d4c957f2dULL;
}

// The same for an expert's adapter: one draw per (training forward, layer, projection,
// expert, block), `block` the first row of the rows it runs on in their buffer.
inline uint64_t lora_expert_dropout_seed(uint64_t forward_step, int64_t layer, ExpertProj p, int64_t expert,
                                         int64_t block) {
  uint64_t h = (forward_step * 1000003ULL + static_cast<uint64_t>(layer)) * 3ULL + static_cast<uint64_t>(p);
  h = h * 65537ULL + static_cast<uint64_t>(expert);
  return h * 1000033ULL + static_cast<uint64_t>(block) + 0x2545f4914f6cdd1dULL;
}

class LoraAdapters {
 public:
  // InputError for a rank or layer count the model cannot take.
  LoraAdapters(const ModelConfig& model, LoraConfig cfg);

  const LoraConfig& config() const { return cfg_; }
  const ParamTable& table() const { return table_; }
  std::span<float> params() { return params_.span(); }
  std::span<const float> params() const { return params_.span(); }
  std::span<float> grads();  // allocated on first use
  void zero_grads();
  // The first adapted layer: backward need not go below it.
  int64_t first_layer() const { return first_layer_; }
  // A layer's adapter on one of its own linear layers (attention, the dense MLP, or
  // Qwen2-MoE's shared expert for gate/up/down); inactive where not adapted.
  const LoraSlot& slot(int64_t layer, LoraTarget t) const {
    return slots_[static_cast<size_t>(layer)][static_cast<size_t>(t)];
  }
  // Expert e's adapter on projection p of MoE layer `layer`; inactive where not adapted.
  const LoraSlot& expert_slot(int64_t layer, ExpertProj p, int64_t e) const;

  // PEFT's initialisation: A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
  // B = 0.
  void init_random(uint64_t seed);

  // PEFT's layout for LlamaForCausalLM: adapter_model.safetensors with
  // "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight" (rank, in) and
  // ".lora_B.weight" (out, rank), and adapter_config.json. Hugging Face PEFT loads it.
  void save_peft(const std::filesystem::path& dir, const std::string& base_model) const;
  // Reads a PEFT adapter directory for a model of config `model`. InputError naming the
  // file for a missing or misshapen tensor, an unsupported setting (DoRA, rsLoRA, biases).
  // Non-finite adapter weights are reported as Llama::load reports the model's.
  static LoraAdapters load_peft(const std::filesystem::path& dir, const ModelConfig& model,
                                io::NonFinitePolicy non_finite = io::NonFinitePolicy::warn);
  // Reads adapters in either layout from a folder or from a weights file inside one (its
  // adapter_config.json beside it): PEFT's, or mlx_lm's (adapters.safetensors with
  // "model.layers.{i}.self_attn.q_proj.lora_a" (in, rank) and ".lora_b" (rank, out), and an
  // adapter_config.json with num_layers and lora_parameters {rank, scale, dropout, keys};
  // alpha = scale * rank). The config decides: `lora_parameters` means mlx_lm.
  static LoraAdapters load(const std::filesystem::path& path, const ModelConfig& model,
                           io::NonFinitePolicy non_finite = io::NonFinitePolicy::warn);

  // W += scale * B A for every adapted layer of `base_params` (laid out by `layout`):
  // the fused model computes what base + adapters compute (dropout is off at inference).
  void merge_into(std::span<float> base_params, const ParamLayout& layout) const;

  // An adapted layer's forward, for training and decoding alike (a no-op where (layer, t)
  // is not adapted): out (N, out) += u B^T with u (N, rank) = scale * dropout(x) A^T kept
  // for backward; x (N, in). With a dropout seed the dropped-out input goes to
  // xd (N, in), scratch; without one (inference, or dropout 0) x is used as it is.
  // `input`: the products' number format (the model's: bf16 rounds x and the adapters).
  void forward(int64_t layer, LoraTarget t, float* out, const float* x, float* u, float* xd, int64_t N,
               std::optional<uint64_t> dropout_seed, kernels::GemmInput input = kernels::GemmInput::f32) const;
  // forward's two products, for a caller that sums u over ranks between them (a
  // row-parallel layer under tensor parallelism: each rank's u from its input columns):
  // u (N, rank) = scale * x A^T, then out (N, out) += u B^T. No-ops where not adapted.
  void project_down(int64_t layer, LoraTarget t, float* u, const float* x, int64_t N, kernels::GemmInput input) const;
  void project_up(int64_t layer, LoraTarget t, float* out, const float* u, int64_t N, kernels::GemmInput input) const;
  // An expert's adapter, forward: out (n, out) += scale * dropout(x) A^T B^T for expert e's
  // n rows x (n, in) of projection p (a no-op where not adapted). Nothing is kept for
  // backward: it recomputes the (n, rank) product, as narrow as the rank.
  // Under tensor parallelism (`tp`, model/tensor_parallel.hpp; null: none) the expert is
  // split as a dense MLP and so is its adapter: gate's and up's B by output rows (A whole),
  // down's A by input columns (B whole). Down's u, this rank's columns' share, is summed
  // over the tp group and tp rank 0 alone adds u B^T (the mixture's all-reduce sums the
  // ranks' outputs); its dropout masks are the whole input's for this rank's columns.
  void expert_forward(int64_t layer, ExpertProj p, int64_t e, float* out, const float* x, int64_t n,
                      std::optional<uint64_t> dropout_seed, kernels::GemmInput input,
                      TensorParallelGroup* tp = nullptr) const;
  // Its backward, given d(out) (n, out) and the same x: the adapter's gradients added into
  // grads(), and d(x) added into dx (n, in) (null: not needed).
  //   u = scale * xd A^T, out += u B^T  =>  dB += dout^T u;  du = scale * dout B;
  //   dA += du^T xd;  dxd = du A;  dx += dropout'(dxd)
  // Under tp: gate's and up's du is this rank's rows' share; d(x) takes it (d(ln2) is
  // summed after) and A, whole, takes du summed over the tp group. Down's u is summed again
  // as in forward; its du is whole: dB, dA (this rank's columns) and d(x) as on one rank.
  void expert_backward(int64_t layer, ExpertProj p, int64_t e, float* dx, const float* dout, const float* x,
                       int64_t n, std::optional<uint64_t> dropout_seed, kernels::GemmInput input,
                       TensorParallelGroup* tp = nullptr);

  // The same for one base tensor `name` (e.g. "model.layers.3.self_attn.q_proj.weight"),
  // w (out, in): for bases merged tensor by tensor (quantized ones). False when unadapted.
  bool merge_into_tensor(std::string_view name, std::span<float> w) const;

 private:
  // One adapted linear layer: its base module's name (e.g.
  // "model.layers.3.block_sparse_moe.experts.5.w1"), where its A and B sit, and what it is.
  struct Module {
    std::string base;
    int64_t layer = 0;
    LoraTarget target = LoraTarget::q;
    int64_t expert = -1;  // >= 0: that expert's projection
    LoraSlot slot;
  };
  void merge_slot(const LoraSlot& s, float* w) const;
  static nlohmann::json read_adapter_config(const std::filesystem::path& config_path);
  static LoraAdapters load_peft_files(const nlohmann::json& config, const std::filesystem::path& config_path,
                                      const std::filesystem::path& weights_path, const ModelConfig& model,
                                      io::NonFinitePolicy non_finite);
  static LoraAdapters load_mlx_files(const nlohmann::json& config, const std::filesystem::path& config_path,
                                     const std::filesystem::path& weights_path, const ModelConfig& model,
                                     io::NonFinitePolicy non_finite);
  class Table : public ParamTable {
   public:
    using ParamTable::add;
  };
  ModelConfig model_;
  LoraConfig cfg_;
  Table table_;
  int64_t first_layer_ = 0;
  std::vector<Module> modules_;                                // in the table's order
  std::vector<std::array<LoraSlot, kNumLoraTargets>> slots_;  // (n_layers, 10)
  // (n_layers, 3, E): an MoE layer's experts' adapters; empty where none are adapted.
  std::vector<std::array<std::vector<LoraSlot>, kNumExpertProjs>> expert_slots_;
  Buffer<float> params_, grads_;
};

}  // namespace flotilla::model
