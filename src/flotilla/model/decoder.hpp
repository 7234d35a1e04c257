// Inference with a KV cache: feed a prompt, then one token at a time; each step appends
// the new positions' keys and values to the cache and returns the last position's logits.
#pragma once

#include <cstdint>
#include <span>

#include "flotilla/base/buffer.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::model {

class Decoder {
 public:
  // max_tokens bounds prompt + generated tokens (the cache's length). `adapters` (not
  // owned, may be null): LoRA applied on the fly, for bases that cannot be merged into in
  // place (quantized ones); dropout is off at inference.
  Decoder(const Llama& model, int64_t max_tokens, const LoraAdapters* adapters = nullptr);

  // Runs `tokens` at positions position() .. position()+n-1; returns logits (V) of the last.
  std::span<const float> step(std::span<const int32_t> tokens);
  int64_t position() const { return length_; }
  int64_t max_tokens() const { return max_tokens_; }
  void reset() { length_ = 0; }

 private:
  void reserve(int64_t n);

  const Llama& model_;
  const LoraAdapters* adapters_;
  Buffer<float> lora_u_;   // (n, rank), shared by every adapted layer
  int64_t max_tokens_;
  int64_t length_ = 0;
  Buffer<float> k_cache_;  // (L, max_tokens, NKV, hd)
  Buffer<float> v_cache_;  // (L, max_tokens, NKV, hd)
  Buffer<float> inv_freq_; // (hd/2)
  // Workspace for up to `capacity_` new tokens per step.
  int64_t capacity_ = 0;
  // x_ (n, C) the residual stream, updated in place block by block; the rest is what the
  // block writes (see Llama::block_forward), overwritten by the next.
  Buffer<float> x_, ln_, q_, attn_, resid_mid_, gate_, up_, act_, probs_, rope_cos_, rope_sin_;
  // Mixture-of-experts layers' (model/moe.hpp): empty for a dense model.
  Buffer<float> router_probs_, expert_gate_, expert_up_, expert_out_, shared_out_, shared_gate_, moe_rows_;
  Buffer<float> logits_;   // (V)
  Buffer<float> rstd_;     // (n)
};

}  // namespace flotilla::model
