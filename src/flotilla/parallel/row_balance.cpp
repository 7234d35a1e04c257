#include "flotilla/parallel/row_balance.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/communicator.hpp"

namespace flotilla::parallel {

std::vector<int64_t> split_rows_by_speed(int64_t rows, std::span<const double> speeds, int64_t min_rows) {
  const auto n = static_cast<int64_t>(speeds.size());
  if (n == 0 || min_rows < 0 || rows < min_rows * n)
    throw Error("parallel/balance", fmt::format("cannot cut {} rows into {} shares of at least {}", rows, n, min_rows));
  // Unusable speeds (no measurement, a clock that went wrong) count as the mean of the rest.
  double good_sum = 0.0;
  int64_t good = 0;
  for (const double s : speeds)
    if (std::isfinite(s) && s > 0.0) {
      good_sum += s;
      ++good;
    }
  std::vector<double> w(static_cast<size_t>(n), 1.0);
  if (good > 0)
    for (int64_t r = 0; r < n; ++r) {
      const double s = speeds[static_cast<size_t>(r)];
      w[static_cast<size_t>(r)] = std::isfinite(s) && s > 0.0 ? s : good_sum / static_cast<double>(good);
    }
  double total = 0.0;
  for (const double x : w) total += x;  // in rank order: the same bits on every rank

  const int64_t spare = rows - min_rows * n;
  std::vector<int64_t> shares(static_cast<size_t>(n), min_rows);
  std::vector<double> remainder(static_cast<size_t>(n), 0.0);
  int64_t given = 0;
  for (int64_t r = 0; r < n; ++r) {
    const double quota = static_cast<double>(spare) * (w[static_cast<size_t>(r)] / total);
    // The floor of a quota is at most `spare`; rounding of the quotas' sum above `spare` is
    // caught below, so no rank is ever given more than the rows there are.
    const auto whole = std::min<int64_t>(spare - given, static_cast<int64_t>(std::floor(quota)));
    shares[static_cast<size_t>(r)] += whole;
    given += whole;
    remainder[static_cast<size_t>(r)] = quota - std::floor(quota);
  }
  // The rows left over go one each to the largest remainders; ties to the lower rank.
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return remainder[static_cast<size_t>(a)] > remainder[static_cast<size_t>(b)];
  });
  for (int64_t i = 0; given < spare; i = (i + 1) % n, ++given) ++shares[static_cast<size_t>(order[static_cast<size_t>(i)])];
  return shares;
}

RowBalancer::RowBalancer(comm::Communicator* comm, RowBalanceConfig config)
    : comm_(comm), config_(config) {
  const int n = comm ? comm->size() : 1;
  if (config.every <= 0)
    throw InputError("parallel/balance", fmt::format("--balance-every must be 1 or more steps, not {}", config.every));
  if (!(config.smoothing > 0.0 && config.smoothing <= 1.0))
    throw InputError("parallel/balance", fmt::format("the smoothing weight must be in (0, 1], not {}", config.smoothing));
  if (config.global_rows < config.min_rows * n)
    throw InputError("parallel/balance",
                     fmt::format("--balance needs at least {} rows per rank (one per micro-batch); the global batch "
                                 "has {} rows for {} ranks",
                                 config.min_rows, config.global_rows, n));
  speeds_.assign(static_cast<size_t>(n), 0.0);
  const std::vector<double> equal(static_cast<size_t>(n), 1.0);
  shares_ = split_rows_by_speed(config.global_rows, equal, config.min_rows);
}

int64_t RowBalancer::first_row(int rank) const {
  int64_t first = 0;
  for (int r = 0; r < rank; ++r) first += shares_[static_cast<size_t>(r)];
  return first;
}

void RowBalancer::restore(std::vector<int64_t> shares, std::vector<double> speeds) {
  const size_t n = shares_.size();
  if (shares.size() != n || speeds.size() != n)
    throw InputError("parallel/balance", fmt::format("the saved shares are for {} ranks, this run has {}", shares.size(), n));
  int64_t sum = 0;
  for (const int64_t s : shares) {
    if (s < config_.min_rows)
      throw InputError("parallel/balance", fmt::format("a saved share of {} rows is below {} (one per micro-batch)", s,
                                                       config_.min_rows));
    sum += s;
  }
  if (sum != config_.global_rows)
    throw InputError("parallel/balance",
                     fmt::format("the saved shares add up to {} rows, this run's global batch has {}", sum, config_.global_rows));
  for (const double v : speeds)
    if (!(std::isfinite(v) && v >= 0.0))
      throw InputError("parallel/balance", fmt::format("a saved speed of {} rows per second", v));
  shares_ = std::move(shares);
  speeds_ = std::move(speeds);
}

void RowBalancer::record(int64_t rows, double compute_s) {
  window_rows_ += static_cast<double>(rows);
  window_s_ += compute_s;
}

bool RowBalancer::after_step(int64_t step) {
  if (step % config_.every != 0) return false;
  const std::array<double, 2> mine = {window_rows_, window_s_};
  std::vector<double> all(2 * speeds_.size());
  if (comm_ && comm_->size() > 1)
    comm_->all_gather(std::span<const double>(mine), std::span<double>(all), comm::Options{.name = "row balance"});
  else
    std::copy(mine.begin(), mine.end(), all.begin());
  window_rows_ = window_s_ = 0.0;
  // Every rank runs this on the same gathered doubles: the same speeds, the same cut.
  for (size_t r = 0; r < speeds_.size(); ++r) {
    const double rows = all[2 * r], seconds = all[2 * r + 1];
    if (!(rows > 0.0 && seconds > 0.0 && std::isfinite(seconds))) continue;  // keep the last estimate
    const double speed = rows / seconds;
    speeds_[r] = speeds_[r] > 0.0 ? config_.smoothing * speed + (1.0 - config_.smoothing) * speeds_[r] : speed;
  }
  std::vector<int64_t> shares = split_rows_by_speed(config_.global_rows, speeds_, config_.min_rows);
  const bool changed = shares != shares_;
  shares_ = std::move(shares);
  return changed;
}

}  // namespace flotilla::parallel
