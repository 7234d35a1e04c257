// Named parameters in one flat, contiguous float buffer (and gradients in a second buffer
// of the same layout), so that later work can cut the buffer into per-rank shards (ZeRO)
// or per-stage ranges (pipeline) without a rewrite. Names are Hugging Face's.
#pragma once

#include <cstdint>
#include <string_view>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "flotilla/model/config.hpp"

namespace flotilla::model {

// Where one tensor of the model is: absent (a bias the architecture has not), a float
// tensor at an offset of the flat buffer, or a matrix stored quantized outside it (the
// model's slot-th quantized matrix, in layout order). Made once, by the layout; the
// model's linear layers dispatch on it.
class WeightRef {
 public:
  enum class Kind : uint8_t { absent, dense, quantized };
  WeightRef() = default;
  static WeightRef dense(int64_t offset) { return WeightRef(Kind::dense, offset); }
  static WeightRef quantized(int64_t slot) { return WeightRef(Kind::quantized, slot); }

  Kind kind() const { return kind_; }
  bool present() const { return kind_ != Kind::absent; }
  bool is_dense() const { return kind_ == Kind::dense; }
  bool is_quantized() const { return kind_ == Kind::quantized; }
  int64_t offset() const { return kind_ == Kind::dense ? index_ : bad_access("a float offset"); }
  int64_t slot() const { return kind_ == Kind::quantized ? index_ : bad_access("a quantized slot"); }
  bool operator==(const WeightRef&) const = default;

 private:
  WeightRef(Kind kind, int64_t index) : kind_(kind), index_(index) {}
  [[noreturn]] int64_t bad_access(const char* what) const;
  Kind kind_ = Kind::absent;
  int64_t index_ = 0;  // the offset (dense) or the slot (quantized)
};

// [begin, end) of the flat parameter buffer, in floats: a part of it a rank holds (ZeRO-3's
// shard is a list of these, parallel/zero3.hpp).
struct ElementRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

struct ParamInfo {
  std::string name;             // e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;   // PyTorch layout, Linear weights (out, in)
  int64_t offset = 0;           // into the flat buffer, in floats
  int64_t numel = 0;
  bool decay = true;            // weight decay applies (false for norms and biases)
  // Stored quantized (outside the flat buffer): numel is 0, offset is where the tensor
  // would have begun (it takes no room), and quant_slot indexes the model's quantized
  // matrices in layout order.
  bool quantized = false;
  int64_t quant_slot = 0;
  WeightRef ref() const { return quantized ? WeightRef::quantized(quant_slot) : WeightRef::dense(offset); }
};

// The expert a tensor's name belongs to ("model.layers.3.block_sparse_moe.experts.5.w1.weight"
// -> 5, "...mlp.experts.5.gate_proj.weight" -> 5), or -1 for any other tensor (a shared
// expert's included).
int64_t expert_of_tensor(std::string_view name);

// One expert of a mixture: a SwiGLU MLP of width Fe.
struct ExpertParams {
  WeightRef gate_proj;  // (Fe, C)  Mixtral's w1
  WeightRef up_proj;    // (Fe, C)  Mixtral's w3
  WeightRef down_proj;  // (C, Fe)  Mixtral's w2
};

// Where each tensor of one transformer block is. Biases are absent unless the config has
// them (qwen2's q, k, v). The dense MLP (gate/up/down_proj, width cfg.dense_mlp_dim(l)) is
// a dense layer's MLP, or an MoE layer's shared expert (Qwen2-MoE), or absent (Mixtral).
struct LayerParams {
  WeightRef ln1, q_proj, q_bias, k_proj, k_bias, v_proj, v_bias, o_proj;
  WeightRef ln2, gate_proj, up_proj, down_proj;
  // An MoE layer's router (E, C), experts, and the shared expert's gate (1, C) (Qwen2-MoE).
  WeightRef router;
  std::vector<ExpertParams> experts;
  WeightRef shared_expert_gate;
};

// Named tensors in one flat buffer: what an optimizer, a checkpoint or a gradient
// all-reduce needs to know of a set of parameters.
class ParamTable {
 public:
  const std::vector<ParamInfo>& params() const { return params_; }
  int64_t total_numel() const { return total_; }
  const ParamInfo* find(std::string_view name) const;

 protected:
  // Appends a tensor, 16-float (64-byte) aligned; returns its offset.
  int64_t add(std::string name, std::vector<int64_t> shape, bool decay);
  // Appends a tensor stored quantized (no floats); returns its slot.
  int64_t add_quantized(std::string name, std::vector<int64_t> shape);
  int64_t num_quantized_ = 0;

 private:
  std::vector<ParamInfo> params_;
  int64_t total_ = 0;
};

// The layout of a model's parameters: computed from the config alone.
class ParamLayout : public ParamTable {
 public:
  // `quantized`: names of the weights stored quantized (Linear weights, embeddings).
  explicit ParamLayout(const ModelConfig& cfg, const std::set<std::string>& quantized = {});
  int64_t num_quantized() const { return num_quantized_; }

  // The tensors the forward pass uses.
  WeightRef embed;             // (V, C)
  std::vector<LayerParams> layers;
  WeightRef final_norm;        // (C)
  WeightRef lm_head;           // (V, C); == embed when tied
};

}  // namespace flotilla::model
