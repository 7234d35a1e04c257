#include "flotilla/train/adamw.hpp"

#include "flotilla/base/error.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::train {

AdamW::AdamW(const model::ParamTable& layout, AdamWConfig cfg)
    : layout_(layout),
      cfg_(cfg),
      m_(static_cast<size_t>(layout.total_numel())),
      v_(static_cast<size_t>(layout.total_numel())) {}

void AdamW::step(std::span<float> params, std::span<const float> grads, float lr) {
  if (params.size() != m_.size() || grads.size() != m_.size())
    throw Error("train/adamw", "parameter, gradient and state sizes differ");
  ++step_;
  for (const model::ParamInfo& info : layout_.params()) {
    kernels::AdamWParams hp;
    hp.lr = lr;
    hp.beta1 = cfg_.beta1;
    hp.beta2 = cfg_.beta2;
    hp.eps = cfg_.eps;
    hp.weight_decay = info.decay ? cfg_.weight_decay : 0.0f;
    hp.step = step_;
    kernels::adamw_update(params.data() + info.offset, grads.data() + info.offset, m_.data() + info.offset,
                          v_.data() + info.offset, info.numel, hp);
  }
}

}  // namespace flotilla::train
