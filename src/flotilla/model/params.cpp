#include "flotilla/model/params.hpp"

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla::model {

ParamLayout::ParamLayout(const ModelConfig& cfg, const std::set<std::string>& quantized) {
  // Linear weights and embeddings may be stored quantized; norms and biases never are.
  auto weight = [&](std::string name, std::vector<int64_t> shape) {
    if (quantized.count(name)) return WeightRef::quantized(add_quantized(std::move(name), std::move(shape)));
    return WeightRef::dense(add(std::move(name), std::move(shape), true));
  };
  auto vector = [&](std::string name, int64_t n) { return WeightRef::dense(add(std::move(name), {n}, false)); };
  const int64_t C = cfg.dim, V = cfg.vocab_size, F = cfg.ffn_dim;
  const int64_t Dq = cfg.q_dim(), Dkv = cfg.kv_dim();
  embed = weight("model.embed_tokens.weight", {V, C});
  layers.resize(static_cast<size_t>(cfg.n_layers));
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    LayerParams& lp = layers[static_cast<size_t>(l)];
    lp.ln1 = vector(p + "input_layernorm.weight", C);
    lp.q_proj = weight(p + "self_attn.q_proj.weight", {Dq, C});
    if (cfg.qkv_bias) lp.q_bias = vector(p + "self_attn.q_proj.bias", Dq);
    lp.k_proj = weight(p + "self_attn.k_proj.weight", {Dkv, C});
    if (cfg.qkv_bias) lp.k_bias = vector(p + "self_attn.k_proj.bias", Dkv);
    lp.v_proj = weight(p + "self_attn.v_proj.weight", {Dkv, C});
    if (cfg.qkv_bias) lp.v_bias = vector(p + "self_attn.v_proj.bias", Dkv);
    lp.o_proj = weight(p + "self_attn.o_proj.weight", {C, Dq});
    lp.ln2 = vector(p + "post_attention_layernorm.weight", C);
    if (!cfg.moe_layer(l)) {
      lp.gate_proj = weight(p + "mlp.gate_proj.weight", {F, C});
      lp.up_proj = weight(p + "mlp.up_proj.weight", {F, C});
      lp.down_proj = weight(p + "mlp.down_proj.weight", {C, F});
    } else if (cfg.arch == Architecture::mixtral) {
      // transformers' MixtralSparseMoeBlock: gate = the router; w1 gate, w3 up, w2 down.
      const int64_t E = cfg.moe.num_experts, Fe = cfg.moe.expert_ffn_dim;
      lp.router = weight(p + "block_sparse_moe.gate.weight", {E, C});
      for (int64_t e = 0; e < E; ++e) {
        const std::string x = fmt::format("{}block_sparse_moe.experts.{}.", p, e);
        ExpertParams ep;
        ep.gate_proj = weight(x + "w1.weight", {Fe, C});
        ep.down_proj = weight(x + "w2.weight", {C, Fe});
        ep.up_proj = weight(x + "w3.weight", {Fe, C});
        lp.experts.push_back(ep);
      }
    } else {
      // transformers' Qwen2MoeSparseMoeBlock: gate = the router, experts, shared_expert
      // and its one-output shared_expert_gate.
      const int64_t E = cfg.moe.num_experts, Fe = cfg.moe.expert_ffn_dim, Fs = cfg.moe.shared_expert_ffn_dim;
      lp.router = weight(p + "mlp.gate.weight", {E, C});
      for (int64_t e = 0; e < E; ++e) {
        const std::string x = fmt::format("{}mlp.experts.{}.", p, e);
        ExpertParams ep;
        ep.gate_proj = weight(x + "gate_proj.weight", {Fe, C});
        ep.up_proj = weight(x + "up_proj.weight", {Fe, C});
        ep.down_proj = weight(x + "down_proj.weight", {C, Fe});
        lp.experts.push_back(ep);
      }
      if (Fs > 0) {
        lp.gate_proj = weight(p + "mlp.shared_expert.gate_proj.weight", {Fs, C});
        lp.up_proj = weight(p + "mlp.shared_expert.up_proj.weight", {Fs, C});
        lp.down_proj = weight(p + "mlp.shared_expert.down_proj.weight", {C, Fs});
        lp.shared_expert_gate = weight(p + "mlp.shared_expert_gate.weight", {1, C});
      }
    }
  }
  final_norm = vector("model.norm.weight", C);
  lm_head = cfg.tie_embeddings ? embed : weight("lm_head.weight", {V, C});
}

int64_t ParamTable::add(std::string name, std::vector<int64_t> shape, bool decay) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  // Keep every tensor 16-float (64-byte) aligned in the flat buffer: SIMD loads and GEMM
  // packing like it, and shard boundaries can fall between tensors cleanly.
  const int64_t offset = (total_ + 15) / 16 * 16;
  params_.push_back(ParamInfo{std::move(name), std::move(shape), offset, numel, decay});
  total_ = offset + numel;
  return offset;
}

int64_t ParamTable::add_quantized(std::string name, std::vector<int64_t> shape) {
  const int64_t slot = num_quantized_++;
  params_.push_back(ParamInfo{std::move(name), std::move(shape), total_, 0, true, true, slot});
  return slot;
}

int64_t WeightRef::bad_access(const char* what) const {
  throw Error("model", fmt::format("a {} weight reference read as {}",
                                   kind_ == Kind::absent ? "absent" : kind_ == Kind::dense ? "float" : "quantized", what));
}

int64_t expert_of_tensor(std::string_view name) {
  constexpr std::string_view kExperts = ".experts.";
  const size_t at = name.find(kExperts);
  if (at == std::string_view::npos) return -1;
  size_t i = at + kExperts.size();
  if (i >= name.size() || name[i] < '0' || name[i] > '9') return -1;
  int64_t expert = 0;
  for (; i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i) expert = expert * 10 + (name[i] - '0');
  return expert;
}

const ParamInfo* ParamTable::find(std::string_view name) const {
  for (const auto& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

}  // namespace flotilla::model
