// The points at which a parallel scheme acts on the model. model/ sits below comm/ and
// parallel/ (DESIGN.md), so the model cannot call them; it calls this interface instead,
// and parallel/ implements it: ZeRO-3 gathers a group's parameters before use and frees
// them after, gradient overlap and ZeRO-2 start reducing a range as soon as backward has
// finished it. The default does nothing: a model without a context is the one-rank model.
#pragma once

#include <cstdint>

namespace flotilla::model {

// The parameters one hook is about: the embedding, one decoder block, or the head (the
// final norm and an untied lm_head).
struct ParamGroup {
  enum class Kind : uint8_t { embedding, block, head };
  Kind kind = Kind::block;
  int64_t layer = 0;  // the block's index; 0 for the embedding and the head
  static ParamGroup embedding() { return {Kind::embedding, 0}; }
  static ParamGroup block(int64_t layer) { return {Kind::block, layer}; }
  static ParamGroup head() { return {Kind::head, 0}; }
  bool operator==(const ParamGroup&) const = default;
};

// A range [begin, end) of the trainable gradient buffer (Llama::trainable().grads).
struct GradSpan {
  int64_t begin = 0, end = 0;
};

class ParallelContext {
 public:
  virtual ~ParallelContext() = default;
  // The group's weights are about to be read by forward (the block's recompute under
  // gradient checkpointing included) / by backward.
  virtual void before_group_forward(ParamGroup) {}
  virtual void before_group_backward(ParamGroup) {}
  // This range of the trainable gradients is final for this backward: the head first, then
  // each block from the last down, then the embedding (Llama::grad_ready_order).
  virtual void grad_ready(GradSpan) {}
};

}  // namespace flotilla::model
