// Step time, speed-up and efficiency on n ranks: Amdahl's law with a communication term.
//
// One rank's optimizer step splits into compute (forward + backward: the part more ranks
// share), serial work every rank repeats whatever n is (drawing batches, the optimizer
// update), and, on n > 1 ranks, the exchange:
//
//   T(n) = compute(n) + serial(n) + comm(n)
//
// Weak scaling — what `flotilla train` does under mpirun, since --batch-size is per rank:
// every rank keeps the user's micro-batch, the global batch grows n-fold, and
//   compute(n) = compute(1),  speed-up(n) = n T(1) / T(n),  efficiency = T(1) / T(n);
// an epoch takes 1/n of the steps, so its time falls by n x efficiency.
//
// Strong scaling — a fixed global batch (the 1-rank batch, cut into n micro-batches):
//   compute(n) = compute(1) / n,  speed-up(n) = T(1) / T(n) = 1 / (s + (1-s)/n + c(n))
// with the serial fraction s = serial(1) / T(1) and c(n) = comm(n) / T(1): Amdahl's law
// 1 / (s + (1-s)/n) plus what the network adds. However many ranks, the speed-up stays
// below 1/s: a thousand machines do not make a one-second run.
//
// Ranks that share a host share its cores: when ranks_per_host x threads exceeds the
// cores, every rank's compute and serial work slow by that ratio (time slicing); and
// they share its memory bandwidth and caches, a slow-down measured when plan runs under
// mpirun on one host (StepCost::contention), applied whenever ranks share a host.
//
// Stragglers: the all-reduce starts when the slowest rank is done, so a step on n ranks
// takes the maximum of n draws of one rank's work (data + compute). The median of that
// maximum, for independent ranks, is the 0.5^(1/n) quantile of one rank's distribution:
// the planner reads it off the measured steps (wait = that quantile - the median), so a
// machine whose steps vary predicts more waiting at larger n. Beyond the measured
// samples' maximum it cannot see: the wait is capped there.
#pragma once

#include <vector>

#include "flotilla/plan/strategy.hpp"
#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {

// Amdahl's closed form: 1 / (s + (1 - s) / n).
double amdahl_speedup(double serial_fraction, int ranks);
// With the communication share c = comm / T(1): 1 / (s + (1 - s) / n + c).
double strong_speedup(double serial_fraction, int ranks, double comm_fraction);
// serial / total of a one-rank step.
double serial_fraction(const StepCost& cost);
// max(1, ranks on the busiest host x threads / cores).
double oversubscription(const Cluster& cluster, int ranks, int threads);
// How much slower a rank computes when `ranks` run: oversubscription, times the measured
// contention where several share a machine's cores (1 on machines of their own).
double compute_slowdown(const Cluster& cluster, const StepCost& cost, int ranks);
// The median wait for the slowest of n ranks: the 0.5^(1/n) quantile of the samples
// minus their median (0 for n = 1 or no samples).
double straggler_wait_s(const std::vector<double>& samples, int ranks);

struct Prediction {
  int ranks = 1;
  double compute_s = 0, wait_s = 0, serial_s = 0, comm_s = 0;
  double step_s = 0;      // per user step on each rank
  double speedup = 1;     // against one rank with no strategy (T(1) of the plain step)
  double efficiency = 1;  // speedup / ranks
};

Prediction predict_weak(const Strategy& s, const Workload& w, const StepCost& cost, const Cluster& cluster, int ranks);
Prediction predict_strong(const Strategy& s, const Workload& w, const StepCost& cost, const Cluster& cluster, int ranks);

// The smallest K in 2, 4, ..., 64 for which accumulating over K times the user's
// micro-batches brings the all-reduce down to a tenth of the step at `ranks` ranks.
int pick_accumulation(const Workload& w, const StepCost& cost, const Cluster& cluster, int ranks);

// World sizes the tables show: 1..max when max <= 16, else powers of two and max.
std::vector<int> table_ranks(int max_ranks);

}  // namespace flotilla::plan
