#include "flotilla/plan/scaling.hpp"

#include <algorithm>
#include <cmath>

namespace flotilla::plan {

double amdahl_speedup(double s, int n) { return 1.0 / (s + (1.0 - s) / std::max(1, n)); }

double strong_speedup(double s, int n, double c) { return 1.0 / (s + (1.0 - s) / std::max(1, n) + c); }

double serial_fraction(const StepCost& cost) {
  const double total = cost.total_s();
  return total > 0 ? (cost.data_s + cost.update_s) / total : 0.0;
}

double oversubscription(const Cluster& cluster, int ranks, int threads) {
  const double busy = static_cast<double>(cluster.ranks_sharing_cores(ranks)) * std::max(1, threads);
  return std::max(1.0, busy / std::max(1, cluster.cores));
}

double compute_slowdown(const Cluster& cluster, const StepCost& cost, int ranks) {
  double slow = oversubscription(cluster, ranks, cost.threads);
  if (cluster.ranks_sharing_cores(ranks) > 1) slow *= cost.contention;
  return slow;
}

double straggler_wait_s(const std::vector<double>& samples, int n) {
  if (n <= 1 || samples.size() < 2) return 0.0;
  std::vector<double> v = samples;
  std::sort(v.begin(), v.end());
  const auto quantile = [&](double q) {
    const double at = q * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(at);
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (at - static_cast<double>(lo)) * (v[hi] - v[lo]);
  };
  return std::max(0.0, quantile(std::pow(0.5, 1.0 / n)) - quantile(0.5));
}

namespace {

Prediction predict(const Strategy& s, const Workload& w, const StepCost& cost, const Cluster& cluster, int n,
                   double compute_share) {
  Prediction p;
  p.ranks = n;
  const double slow = compute_slowdown(cluster, cost, n);
  p.compute_s = cost.compute_s * compute_share * slow;
  p.wait_s = straggler_wait_s(cost.work_samples_s, n) * compute_share * slow;
  p.serial_s = (cost.data_s + cost.update_s * update_share(s, n)) * slow;
  p.comm_s = comm_cost(s, w, n, cluster).seconds;
  p.step_s = p.compute_s + p.wait_s + p.serial_s + p.comm_s;
  return p;
}

}  // namespace

Prediction predict_weak(const Strategy& s, const Workload& w, const StepCost& cost, const Cluster& cluster, int n) {
  Prediction p = predict(s, w, cost, cluster, n, 1.0);
  p.speedup = p.step_s > 0 ? n * cost.total_s() / p.step_s : 1.0;
  p.efficiency = p.speedup / n;
  return p;
}

Prediction predict_strong(const Strategy& s, const Workload& w, const StepCost& cost, const Cluster& cluster, int n) {
  Prediction p = predict(s, w, cost, cluster, n, 1.0 / std::max(1, n));
  p.speedup = p.step_s > 0 ? cost.total_s() / p.step_s : 1.0;
  p.efficiency = p.speedup / n;
  return p;
}

int pick_accumulation(const Workload& w, const StepCost& cost, const Cluster& cluster, int n) {
  const Strategy plain{StrategyKind::all_reduce, 1, 0.0, true, comm::WireDtype::f32, "", ""};
  const double comm = comm_cost(plain, w, n, cluster.link_for(n)).seconds;
  for (int K = 2; K < 64; K *= 2)
    if (comm / K <= 0.1 * cost.total_s()) return K;
  return 64;
}

std::vector<int> table_ranks(int max_ranks) {
  std::vector<int> out;
  if (max_ranks <= 16) {
    for (int n = 1; n <= max_ranks; ++n) out.push_back(n);
    return out;
  }
  for (int n = 1; n < max_ranks; n *= 2) out.push_back(n);
  out.push_back(max_ranks);
  return out;
}

}  // namespace flotilla::plan
