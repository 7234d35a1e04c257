// Named parameters in one flat, contiguous float buffer (and gradients in a second buffer
// of the same layout), so that later work can cut the buffer into per-rank shards (ZeRO)
// or per-stage ranges (pipeline) without a rewrite. Names are Hugging Face's.
#pragma once

#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "flotilla/model/config.hpp"

namespace flotilla::model {

struct ParamInfo {
  std::string name;             // e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;   // PyTorch layout, Linear weights (out, in)
  int64_t offset = 0;           // into the flat buffer, in floats
  int64_t numel = 0;
  bool decay = true;            // weight decay applies (false for norms and biases)
  // Stored quantized (outside the flat buffer): numel is 0 and offset is a quantized
  // reference (see is_quantized_ref); the model holds the packed matrix.
  bool quantized = false;
};

// A tensor stored quantized takes no space in the flat float buffer; where an offset is
// expected it is written as -2 - slot, slot indexing the model's quantized matrices in
// layout order (-1 keeps meaning "absent").
inline bool is_quantized_ref(int64_t offset) { return offset <= -2; }
inline int64_t quantized_slot(int64_t offset) { return -2 - offset; }

// Where each tensor of one transformer block sits in the flat buffer.
struct LayerParams {
  int64_t ln1 = -1, wq = -1, bq = -1, wk = -1, bk = -1, wv = -1, bv = -1, wo = -1;
  int64_t ln2 = -1, wgate = -1, wup = -1, wdown = -1;
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
  // Appends a tensor stored quantized (no floats); returns its quantized reference.
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

  // Offsets (in floats) of the tensors the forward pass uses.
  int64_t embed = -1;          // (V, C)
  std::vector<LayerParams> layers;
  int64_t final_norm = -1;     // (C)
  int64_t lm_head = -1;        // (V, C); == embed when tied
};

}  // namespace flotilla::model
