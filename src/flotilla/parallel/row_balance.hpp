// Row balancing (`flotilla train --balance`): each data-parallel rank's share of the global
// batch follows its measured speed, so a slow rank (a straggler, an older machine, a host
// with fewer cores) no longer holds every other rank up at the gradient exchange.
//
// Vocabulary:
//   row        one sequence of the global batch: the unit of work, as in the deterministic
//              mode (parallel/deterministic_sync.hpp)
//   share      the number of rows a rank runs in a step; the shares of the ranks add up to
//              the global batch's G rows and are cut from it in rank order: rank r runs rows
//              [first_row(r), first_row(r) + share(r)) of the global batch, the same rows a
//              single process would run, only cut at other points
//   speed      rows per second of a rank's forward and backward alone (no data drawing, no
//              wait in a collective): what the rank could do if it never waited
//   window     the `every` steps between two agreements
//   agreement  after each window one all-gather of every rank's (rows, seconds) of the
//              window; every rank smooths the speeds and cuts the shares with the same
//              arithmetic on the same gathered numbers, so they agree without a further
//              message
//
// The cut (split_rows_by_speed): each rank first gets `min_rows`; the rest goes by largest
// remainder of speed-proportional quotas, ties to the lower rank. The gradient is the global
// batch's whatever the shares: every mode sums per-token gradients and divides once by the
// global target-token count (train/trainer.hpp), and in the deterministic mode the sum of
// fixed-point rows does not depend on which rank ran a row.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace flotilla::comm {
class Communicator;
}

namespace flotilla::parallel {

// `rows` cut into one share per speed: each share at least `min_rows`, the rest in proportion
// to the speeds, largest remainders first (ties: lower index). A speed that is not finite
// or not positive counts as the mean of the others (all of them bad: equal shares).
// Error (a caller's bug) unless rows >= min_rows * speeds.size() > 0. The same doubles give
// the same shares on every rank.
std::vector<int64_t> split_rows_by_speed(int64_t rows, std::span<const double> speeds, int64_t min_rows);

struct RowBalanceConfig {
  int64_t global_rows = 1;   // G
  int64_t min_rows = 1;      // per rank (the trainer asks one per micro-batch)
  int64_t every = 20;        // steps per window
  double smoothing = 0.5;    // weight of the newest window's speed in the average
};

class RowBalancer {
 public:
  // `comm` (null: one process) must outlive the balancer. Starts with equal shares (the
  // remainder of G / N to the lower ranks), the unbalanced run's cut when N divides G.
  RowBalancer(comm::Communicator* comm, RowBalanceConfig config);

  int world() const { return static_cast<int>(shares_.size()); }
  const std::vector<int64_t>& shares() const { return shares_; }
  int64_t share(int rank) const { return shares_[static_cast<size_t>(rank)]; }
  int64_t first_row(int rank) const;
  // The smoothed speeds (rows per second), 0 before the first agreement.
  const std::vector<double>& speeds() const { return speeds_; }

  // A resumed run continues with the shares and smoothed speeds a checkpoint kept (every
  // rank alike: they are the agreed ones), instead of equal shares re-measured from
  // scratch. InputError when they do not fit this balancer (another world, another global
  // batch, a share below min_rows, a speed that is negative or not finite).
  void restore(std::vector<int64_t> shares, std::vector<double> speeds);

  // This rank ran `rows` rows in `compute_s` seconds of forward and backward.
  void record(int64_t rows, double compute_s);
  // After optimizer step `step` (1-based), on every rank alike: at the end of a window,
  // the all-gather and a new cut. True when the shares changed.
  bool after_step(int64_t step);

 private:
  comm::Communicator* comm_;
  RowBalanceConfig config_;
  std::vector<int64_t> shares_;  // (N,)
  std::vector<double> speeds_;   // (N,) smoothed rows per second
  double window_rows_ = 0.0, window_s_ = 0.0;
};

}  // namespace flotilla::parallel
