#include "flotilla/model/moe.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace flotilla::model::moe {

void router_softmax(float* probs, const float* logits, int64_t N, int64_t E) {
  for (int64_t n = 0; n < N; ++n) {
    const float* x = logits + n * E;
    float* p = probs + n * E;
    const float m = *std::max_element(x, x + E);
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      p[e] = std::exp(x[e] - m);
      sum += p[e];
    }
    const auto inv = static_cast<float>(1.0 / sum);
    for (int64_t e = 0; e < E; ++e) p[e] *= inv;
  }
}

void router_softmax_backward(float* dlogits, const float* dprobs, const float* probs, int64_t N, int64_t E) {
  for (int64_t n = 0; n < N; ++n) {
    const float* p = probs + n * E;
    const float* dp = dprobs + n * E;
    double dot = 0.0;
    for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(p[e]) * dp[e];
    for (int64_t e = 0; e < E; ++e) dlogits[n * E + e] = p[e] * (dp[e] - static_cast<float>(dot));
  }
}

void route_top_k(int32_t* experts, float* weights, const float* probs, int64_t N, int64_t E, int64_t K,
                 bool renormalise) {
  for (int64_t n = 0; n < N; ++n) {
    const float* p = probs + n * E;
    int32_t* ex = experts + n * K;
    float* w = weights + n * K;
    // Selection by insertion: K is small (2..8). Strictly greater moves an expert up, so
    // of equal probs the lower index stays first.
    int64_t filled = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (filled == K && !(p[e] > p[ex[K - 1]])) continue;
      int64_t at = filled < K ? filled++ : K - 1;
      while (at > 0 && p[e] > p[ex[at - 1]]) {
        ex[at] = ex[at - 1];
        --at;
      }
      ex[at] = static_cast<int32_t>(e);
    }
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      w[k] = p[ex[k]];
      sum += w[k];
    }
    if (renormalise)
      for (int64_t k = 0; k < K; ++k) w[k] = static_cast<float>(w[k] / sum);
  }
}

void route_top_k_backward(float* dprobs, const float* dweights, const int32_t* experts, const float* weights,
                          const float* probs, int64_t N, int64_t E, int64_t K, bool renormalise) {
  std::memset(dprobs, 0, static_cast<size_t>(N * E) * sizeof(float));
  for (int64_t n = 0; n < N; ++n) {
    const int32_t* ex = experts + n * K;
    const float* dw = dweights + n * K;
    float* dp = dprobs + n * E;
    if (!renormalise) {
      for (int64_t k = 0; k < K; ++k) dp[ex[k]] += dw[k];
      continue;
    }
    // w_k = p_k / S, S = sum_j p_j  =>  dp_k = (dw_k - sum_j dw_j w_j) / S
    double sum = 0.0, dot = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      sum += probs[n * E + ex[k]];
      dot += static_cast<double>(dw[k]) * weights[n * K + k];
    }
    for (int64_t k = 0; k < K; ++k) dp[ex[k]] += static_cast<float>((dw[k] - dot) / sum);
  }
}

Capacity Capacity::of(double factor, int64_t T, int64_t K, int64_t E) {
  if (factor <= 0.0) return {};
  return {static_cast<int64_t>(std::ceil(factor * static_cast<double>(T * K) / static_cast<double>(E))), T};
}

int64_t keep_within_capacity(uint8_t* keep, const int32_t* experts, int64_t N, int64_t K, int64_t E, Capacity cap) {
  std::memset(keep, 1, static_cast<size_t>(N * K));
  if (cap.per_expert <= 0) return 0;
  int64_t dropped = 0;
  std::vector<int64_t> used(static_cast<size_t>(E));
  for (int64_t s = 0; s < N; s += cap.seq_len) {
    std::fill(used.begin(), used.end(), 0);
    const int64_t end = std::min(N, s + cap.seq_len);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = s; n < end; ++n) {
        const int64_t a = n * K + k;
        if (used[static_cast<size_t>(experts[a])]++ < cap.per_expert) continue;
        keep[a] = 0;
        ++dropped;
      }
  }
  return dropped;
}

Dispatch plan_dispatch(const int32_t* experts, int64_t N, int64_t K, int64_t E, Capacity cap) {
  Dispatch d;
  d.num_experts = E;
  d.assignments = N * K;
  std::vector<uint8_t> keep(static_cast<size_t>(N * K));
  d.dropped = keep_within_capacity(keep.data(), experts, N, K, E, cap);
  d.offsets.assign(static_cast<size_t>(E) + 1, 0);
  for (int64_t a = 0; a < N * K; ++a)
    if (keep[static_cast<size_t>(a)]) ++d.offsets[static_cast<size_t>(experts[a]) + 1];
  for (int64_t e = 0; e < E; ++e) d.offsets[static_cast<size_t>(e) + 1] += d.offsets[static_cast<size_t>(e)];
  d.token.resize(static_cast<size_t>(N * K - d.dropped));
  d.assignment.resize(static_cast<size_t>(N * K - d.dropped));
  std::vector<int64_t> next(d.offsets.begin(), d.offsets.end() - 1);
  for (int64_t a = 0; a < N * K; ++a) {
    if (!keep[static_cast<size_t>(a)]) continue;
    const int64_t r = next[static_cast<size_t>(experts[a])]++;
    d.token[static_cast<size_t>(r)] = static_cast<int32_t>(a / K);
    d.assignment[static_cast<size_t>(r)] = static_cast<int32_t>(a);
  }
  return d;
}

void dispatch_gather(float* rows, const float* x, const Dispatch& d, int64_t C) {
  const auto R = static_cast<int64_t>(d.token.size());
  for (int64_t r = 0; r < R; ++r)
    std::memcpy(rows + r * C, x + static_cast<int64_t>(d.token[static_cast<size_t>(r)]) * C,
                static_cast<size_t>(C) * sizeof(float));
}

void dispatch_gather_backward(float* dx, const float* drows, const Dispatch& d, int64_t C) {
  const auto R = static_cast<int64_t>(d.token.size());
  for (int64_t r = 0; r < R; ++r) {
    float* y = dx + static_cast<int64_t>(d.token[static_cast<size_t>(r)]) * C;
    const float* g = drows + r * C;
    for (int64_t c = 0; c < C; ++c) y[c] += g[c];
  }
}

void combine(float* out, const float* expert_out, const float* weights, const Dispatch& d, int64_t C) {
  const auto R = static_cast<int64_t>(d.token.size());
  for (int64_t r = 0; r < R; ++r) {
    float* y = out + static_cast<int64_t>(d.token[static_cast<size_t>(r)]) * C;
    const float* x = expert_out + r * C;
    const float w = weights[d.assignment[static_cast<size_t>(r)]];
    for (int64_t c = 0; c < C; ++c) y[c] += w * x[c];
  }
}

void combine_backward(float* drows, float* dweights, const float* dout, const float* expert_out,
                      const float* weights, const Dispatch& d, int64_t C) {
  const auto R = static_cast<int64_t>(d.token.size());
  if (d.dropped > 0) std::memset(dweights, 0, static_cast<size_t>(d.assignments) * sizeof(float));
  for (int64_t r = 0; r < R; ++r) {
    const float* g = dout + static_cast<int64_t>(d.token[static_cast<size_t>(r)]) * C;
    const float* x = expert_out + r * C;
    const int32_t a = d.assignment[static_cast<size_t>(r)];
    const float w = weights[a];
    float* dr = drows + r * C;
    double dot = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      dr[c] = w * g[c];
      dot += static_cast<double>(g[c]) * x[c];
    }
    dweights[a] = static_cast<float>(dot);
  }
}

void LoadBalancing::reset(int64_t num_experts) {
  num_experts_ = num_experts;
  rows_ = 0;
  dropped_ = assignments_ = 0.0;
  picks_.assign(static_cast<size_t>(num_experts), 0.0);
  prob_sums_.assign(static_cast<size_t>(num_experts), 0.0);
}

void LoadBalancing::add_layer(const float* probs, const int32_t* experts, int64_t N, int64_t K) {
  const int64_t E = num_experts_;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t e = 0; e < E; ++e) prob_sums_[static_cast<size_t>(e)] += probs[n * E + e];
    for (int64_t k = 0; k < K; ++k) picks_[static_cast<size_t>(experts[n * K + k])] += 1.0;
  }
  rows_ += N;
}

void LoadBalancing::add_dropped(int64_t dropped, int64_t assignments) {
  dropped_ += static_cast<double>(dropped);
  assignments_ += static_cast<double>(assignments);
}

std::vector<double> LoadBalancing::statistics() const {
  std::vector<double> stats(picks_);
  stats.insert(stats.end(), prob_sums_.begin(), prob_sums_.end());
  stats.push_back(static_cast<double>(rows_));
  stats.push_back(dropped_);
  stats.push_back(assignments_);
  return stats;
}

void LoadBalancing::set_statistics(std::span<const double> stats) {
  const auto E = static_cast<size_t>(num_experts_);
  picks_.assign(stats.begin(), stats.begin() + static_cast<std::ptrdiff_t>(E));
  prob_sums_.assign(stats.begin() + static_cast<std::ptrdiff_t>(E), stats.begin() + static_cast<std::ptrdiff_t>(2 * E));
  rows_ = static_cast<int64_t>(stats[2 * E]);
  dropped_ = stats[2 * E + 1];
  assignments_ = stats[2 * E + 2];
}

double LoadBalancing::loss() const {
  if (rows_ == 0) return 0.0;
  const auto R = static_cast<double>(rows_);
  double sum = 0.0;
  for (int64_t e = 0; e < num_experts_; ++e)
    sum += (picks_[static_cast<size_t>(e)] / R) * (prob_sums_[static_cast<size_t>(e)] / R);
  return static_cast<double>(num_experts_) * sum;
}

void LoadBalancing::backward(float* dprobs, int64_t N, float scale) const {
  if (rows_ == 0) return;
  const int64_t E = num_experts_;
  const auto R = static_cast<double>(rows_);
  for (int64_t e = 0; e < E; ++e) {
    const auto g = static_cast<float>(scale * static_cast<double>(E) * (picks_[static_cast<size_t>(e)] / R) / R);
    for (int64_t n = 0; n < N; ++n) dprobs[n * E + e] += g;
  }
}

}  // namespace flotilla::model::moe
