// What flotilla's own all-reduce algorithms (comm/algorithms/) must do, written once and
// run on every rank: on the thread backend in tests/comm, under mpirun in tests/dist.
//
// Expected values are in closed form. Rank r contributes, at index i,
//   integers: (r + 1) * 1000 + i % 1009          sum = 1000 n(n+1)/2 + n (i % 1009)
//   floats:   (r + 1) * 0.1 + (i % 13) * 0.001    sum computed in double from the same
//                                                  float inputs
// Integers must match exactly. Floats within 1e-6 relative: the algorithms add in an
// order of their own (up to 5 terms of float rounding, ~3e-7), never the closed form's.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "flotilla/comm/algorithms/all_reduce.hpp"

namespace flotilla::comm::algorithm_spec {

// Lengths for a world of n: empty, one, two, n - 1, n + 1, and odd and long.
inline std::vector<size_t> lengths_for(int n) {
  return {0, 1, 2, static_cast<size_t>(n - 1), static_cast<size_t>(n + 1), 10007};
}

template <class T>
T contribution(int r, size_t i) {
  if constexpr (std::is_floating_point_v<T>)
    return static_cast<T>((r + 1) * 0.1 + static_cast<double>(i % 13) * 0.001);
  else
    return static_cast<T>((r + 1) * 1000 + static_cast<int64_t>(i % 1009));
}

template <class T>
double expected(int n, size_t i, ReduceOp op) {
  double sum = 0, max = -1e300;
  for (int r = 0; r < n; ++r) {
    const double v = static_cast<double>(contribution<T>(r, i));
    sum += v;
    max = std::max(max, v);
  }
  if (op == ReduceOp::max) return max;
  if (op == ReduceOp::avg) return sum / n;
  return sum;
}

template <class T>
void check_one(AllReducer& reducer, size_t len, ReduceOp op, const std::string& label) {
  Communicator& c = reducer.communicator();
  std::vector<T> data(len);  // (len)
  for (size_t i = 0; i < len; ++i) data[i] = contribution<T>(c.rank(), i);
  reducer.run(data, op, {.name = "spec"});
  const std::string what = label + " " + std::string(element_name(element_type_of<T>())) + " " +
                           std::string(reduce_name(op)) + " len " + std::to_string(len) +
                           " rank " + std::to_string(c.rank()) + " of " +
                           std::to_string(c.size());
  for (size_t i = 0; i < len; ++i) {
    const double want = expected<T>(c.size(), i, op);
    if constexpr (std::is_floating_point_v<T>)
      ASSERT_LE(std::abs(static_cast<double>(data[i]) - want), 1e-6 * std::abs(want))
          << what << " at " << i << ": " << data[i] << " vs " << want;
    else
      ASSERT_EQ(data[i], static_cast<T>(want)) << what << " at " << i;
  }
}

// Every length, element type (f32, f64, i32, i64) and operation on one configuration.
inline void closed_form(AllReducer& reducer, const std::string& label) {
  const int n = reducer.communicator().size();
  for (size_t len : lengths_for(n)) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      check_one<int32_t>(reducer, len, op, label);
      check_one<int64_t>(reducer, len, op, label);
      check_one<float>(reducer, len, op, label);
    }
    check_one<float>(reducer, len, ReduceOp::avg, label);
    check_one<double>(reducer, len, ReduceOp::sum, label);
  }
}

// The configurations every world size runs: each algorithm with default segments and
// with tiny ones (3 floats: many segments per chunk, the pipelining's rare paths), and
// hierarchical over every grouping of consecutive ranks into "hosts".
inline std::vector<std::pair<std::string, AllReducer::Config>> configurations(int n) {
  std::vector<std::pair<std::string, AllReducer::Config>> out;
  for (auto a : {AllReduceAlgorithm::ring, AllReduceAlgorithm::halving_doubling,
                 AllReduceAlgorithm::automatic}) {
    AllReducer::Config config;
    config.algorithm = a;
    out.push_back({std::string(algorithm_flag(a)), config});
    config.tuning.segment_bytes = 12;
    config.tuning.window = 2;
    out.push_back({std::string(algorithm_flag(a)) + " tiny segments", config});
  }
  for (int per_host = 1; per_host <= n; ++per_host) {
    AllReducer::Config config;
    config.algorithm = AllReduceAlgorithm::hierarchical;
    config.fake_ranks_per_host = per_host;
    config.tuning.segment_bytes = per_host % 2 ? 12 : size_t{1} << 20;
    out.push_back({"hier " + std::to_string(per_host) + " per host, shm", config});
    config.use_shm = false;
    out.push_back({"hier " + std::to_string(per_host) + " per host, chains", config});
  }
  return out;
}

inline void every_configuration(Communicator& c) {
  for (auto& [label, config] : configurations(c.size())) {
    AllReducer reducer(c, config);
    closed_form(reducer, label);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Every rank ends with the same bits (a data-parallel replica must not drift).
inline void identical_bits_on_every_rank(Communicator& c) {
  // 1000 floats go whole-buffer in hd (recursive doubling), 4099 halve and double.
  for (auto& [label, config] : configurations(c.size())) for (size_t len : {1000, 4099}) {
    AllReducer reducer(c, config);
    std::vector<float> data(len);
    for (size_t i = 0; i < data.size(); ++i)
      data[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i) + c.rank())) / 3.0f;
    reducer.run(data, ReduceOp::sum);
    std::vector<float> all(data.size() * static_cast<size_t>(c.size()));
    c.all_gather(data, all);
    for (int r = 1; r < c.size(); ++r)
      for (size_t i = 0; i < data.size(); ++i)
        ASSERT_EQ(all[i], all[r * data.size() + i]) << label << ": rank " << r << " at " << i;
  }
}

}  // namespace flotilla::comm::algorithm_spec
