#include "flotilla/model/sampling.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla::model {

Sampler::Sampler(SamplingParams params) : params_(params), rng_(params.seed) {
  // Negated comparisons: NaN fails them.
  if (!(std::isfinite(params.temperature) && params.temperature >= 0.0f))
    throw InputError("model/sampling", fmt::format("--temperature must be a finite number >= 0, not {}", params.temperature));
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f))
    throw InputError("model/sampling", fmt::format("--top-p must be in (0, 1], not {}", params.top_p));
  if (params.top_k < 0) throw InputError("model/sampling", "--top-k must be >= 0");
}

int32_t Sampler::sample(std::span<const float> logits) {
  const auto V = static_cast<int64_t>(logits.size());
  if (params_.temperature == 0.0f || params_.top_k == 1)
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());

  candidates_.resize(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) candidates_[static_cast<size_t>(i)] = {logits[static_cast<size_t>(i)], static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  int64_t keep = V;
  if (params_.top_k > 0 && params_.top_k < V) {
    keep = params_.top_k;
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  // Softmax over the kept candidates at the temperature (sorted: the first is the max).
  const float max_logit = candidates_[0].first;
  double total = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    auto& c = candidates_[static_cast<size_t>(i)];
    c.first = std::exp((c.first - max_logit) / params_.temperature);
    total += c.first;
  }
  // Nucleus: the smallest prefix whose probability reaches top_p.
  if (params_.top_p < 1.0f) {
    double cumulative = 0.0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      cumulative += candidates_[static_cast<size_t>(i)].first / total;
      if (cumulative >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = 0.0;
    for (int64_t i = 0; i < keep; ++i) total += candidates_[static_cast<size_t>(i)].first;
  }
  const double r = static_cast<double>(rng_.uniform()) * total;
  double acc = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += candidates_[static_cast<size_t>(i)].first;
    if (r < acc) return candidates_[static_cast<size_t>(i)].second;
  }
  return candidates_[static_cast<size_t>(keep - 1)].second;
}

}  // namespace flotilla::model
