#include "flotilla/train/adamw.hpp"

#include <algorithm>

#include "flotilla/base/error.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::train {
namespace {

int64_t total_size(const std::vector<FlatRange>& ranges) {
  int64_t n = 0;
  for (const FlatRange& r : ranges) n += r.size();
  return n;
}

}  // namespace

AdamW::AdamW(const model::ParamTable& layout, AdamWConfig cfg)
    : AdamW(layout, cfg, {FlatRange{0, layout.total_numel()}}) {}

AdamW::AdamW(const model::ParamTable& layout, AdamWConfig cfg, std::vector<FlatRange> owned)
    : layout_(layout),
      cfg_(cfg),
      owned_(std::move(owned)),
      m_(static_cast<size_t>(total_size(owned_))),
      v_(static_cast<size_t>(total_size(owned_))) {
  int64_t at = 0;
  for (const FlatRange& r : owned_) {
    if (r.begin < at || r.end < r.begin || r.end > layout.total_numel())
      throw Error("train/adamw", "owned ranges must be ascending, disjoint and inside the parameters");
    at = r.end;
  }
}

void AdamW::step(std::span<float> params, std::span<const float> grads, float lr) {
  if (static_cast<int64_t>(params.size()) != layout_.total_numel() || grads.size() != m_.size())
    throw Error("train/adamw", "parameter, gradient and state sizes differ");
  ++step_;
  kernels::AdamWParams hp;
  hp.lr = lr;
  hp.beta1 = cfg_.beta1;
  hp.beta2 = cfg_.beta2;
  hp.eps = cfg_.eps;
  hp.step = step_;
  int64_t state = 0;  // where the current range starts in grads, m and v
  for (const FlatRange& r : owned_) {
    for (const model::ParamInfo& info : layout_.params()) {
      const int64_t b = std::max(r.begin, info.offset), e = std::min(r.end, info.offset + info.numel);
      if (b >= e) continue;
      hp.weight_decay = info.decay ? cfg_.weight_decay : 0.0f;
      const int64_t s = state + (b - r.begin);
      kernels::adamw_update(params.data() + b, grads.data() + s, m_.data() + s, v_.data() + s, e - b, hp);
    }
    state += r.size();
  }
}

}  // namespace flotilla::train
