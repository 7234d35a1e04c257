// Model configuration, read from and written to a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "flotilla/kernels/kernels.hpp"
#include "flotilla/tensor/quant.hpp"

namespace flotilla::model {

enum class Architecture { llama, mistral, qwen2, mixtral, qwen2_moe };

// A mixture-of-experts MLP (Mixtral, Qwen2-MoE; see docs/moe.md). num_experts == 0: a dense
// model. Field names are transformers' where they differ.
struct MoeConfig {
  int64_t num_experts = 0;            // num_local_experts (Mixtral) / num_experts (Qwen2-MoE)
  int64_t top_k = 0;                  // num_experts_per_tok
  int64_t expert_ffn_dim = 0;         // each expert's width: intermediate_size (Mixtral) /
                                      // moe_intermediate_size (Qwen2-MoE)
  int64_t shared_expert_ffn_dim = 0;  // Qwen2-MoE's shared expert (with its sigmoid gate); 0: none
  bool norm_topk_prob = true;         // renormalise the top-k weights to sum to 1 (Mixtral: always)
  float router_aux_loss_coef = 0.001f;
  // transformers adds router_aux_loss_coef x the load-balancing loss to the training loss
  // only when this is true; flotilla does the same (and always reports the aux loss).
  bool output_router_logits = false;
  int64_t decoder_sparse_step = 1;    // Qwen2-MoE: layer l is sparse when (l + 1) % step == 0
  std::vector<int64_t> mlp_only_layers;  // Qwen2-MoE: layers that keep a dense MLP
};

// config.json's "quantization" (MLX: {"group_size": 64, "bits": 4}, newer mlx_lm also as
// "quantization_config"), with the per-module entries newer mlx_lm adds for mixed
// quantization, keyed by module path: false (the module stays float) or its own
// {group_size, bits}. Which tensors are quantized is told by the weights themselves (a
// P.scales next to P.weight), as mlx_lm decides when it loads; this says how.
struct QuantizationConfig {
  QuantFormat format;
  std::map<std::string, std::optional<QuantFormat>, std::less<>> per_module;

  // The format of module `path` (e.g. "model.layers.0.self_attn.q_proj"); nullopt when the
  // config says it stays float.
  std::optional<QuantFormat> for_module(std::string_view path) const;
};

struct ModelConfig {
  Architecture arch = Architecture::llama;
  int64_t vocab_size = 256;
  int64_t dim = 64;            // hidden_size
  int64_t n_layers = 2;        // num_hidden_layers
  int64_t n_heads = 4;         // num_attention_heads
  int64_t n_kv_heads = 4;      // num_key_value_heads
  int64_t head_dim = 16;       // head_dim, default hidden_size / num_attention_heads
  int64_t ffn_dim = 128;       // intermediate_size
  int64_t max_position = 2048; // max_position_embeddings
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  kernels::RopeScaling rope_scaling;  // Llama 3 scaling when factor > 0
  bool tie_embeddings = false;        // tie_word_embeddings
  bool qkv_bias = false;              // qwen2
  int32_t bos_token_id = -1;          // -1: none
  int32_t eos_token_id = -1;
  // Every eos id when config.json lists several (Llama 3.1 Instruct: end_of_text, eom, eot);
  // eos_token_id is the first. Empty means just eos_token_id.
  std::vector<int32_t> eos_token_ids;
  // Mistral v0.1 / Qwen2 sliding-window attention width, 0 = none. We always attend to the
  // whole causal prefix, which equals HF only for sequences no longer than the window.
  int64_t sliding_window = 0;
  float initializer_range = 0.02f;
  std::string torch_dtype = "float32";  // what the source said; we compute in f32
  std::optional<QuantizationConfig> quantization;  // MLX-layout quantized weights
  MoeConfig moe;

  bool is_moe() const { return moe.num_experts > 0; }
  // Whether layer l's MLP is a mixture of experts (every layer of Mixtral; Qwen2-MoE's as
  // decoder_sparse_step and mlp_only_layers say).
  bool moe_layer(int64_t l) const;
  // The width of layer l's dense SwiGLU MLP: ffn_dim for a dense layer, the shared expert's
  // for an MoE layer (0: it has none).
  int64_t dense_mlp_dim(int64_t l) const { return moe_layer(l) ? moe.shared_expert_ffn_dim : ffn_dim; }

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
  int64_t num_params() const;

  // `source` names the file in error messages. Unknown model_type, missing or
  // inconsistent fields are InputErrors naming the file and the field.
  static ModelConfig from_json(const nlohmann::json& j, std::string_view source);
  static ModelConfig load(const std::filesystem::path& config_json);
  // A config.json that transformers' AutoConfig reads as the same model.
  nlohmann::json to_json() const;
};

std::string_view architecture_name(Architecture a);  // "llama", "mistral", "qwen2", "mixtral", "qwen2_moe"

// Presets for `flotilla init`: "tiny", "15M", "110M" (llama2.c's shapes, vocab 32000
// for 15M/110M; tiny is for tests and the byte tokenizer).
ModelConfig preset_config(std::string_view name);

}  // namespace flotilla::model
