// `flotilla bench comm`'s measurement: all-reduce time and bus bandwidth per buffer size,
// for several contenders (flotilla's algorithms, the backend's all_reduce, the MPI
// library's own MPI_Allreduce) side by side in one run. The CLI builds the contenders
// and prints; this file times them.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

struct BenchContender {
  std::string name;                      // "ring", "MPI_Allreduce", ...
  std::function<void(MutView)> run;      // one in-place f32 sum all-reduce
  bool is_flotilla = true;               // counts towards "best flotilla"
};

struct BenchRow {
  size_t bytes = 0;
  int iters = 0;
  std::vector<double> seconds;  // (contenders) per call: the slowest rank's mean
};

// Bus bandwidth in nccl-tests' convention: bytes x 2(n-1)/n / time, in Gbit/s (10^9 bit).
double bus_gbit_s(size_t bytes, int world, double seconds);

// "4K..256M" (powers of two from 4 KiB to 256 MiB), "1M,3M,64M", "4096"; K, M, G are
// binary. Throws InputError on anything else.
std::vector<size_t> parse_sizes(std::string_view text);

// Calls per measurement when `iters` is 0: about 128 MiB moved, between 3 and 200 calls.
int default_iters(size_t bytes);

// For every size: each contender's one call on ranks' (r + 1) values whose result is
// checked (every element = n(n+1)/2: an InputError on every rank if any rank is wrong),
// then each contender's `iters` timed calls between barriers. Collective over `comm`; on_row runs after
// each size on every rank.
std::vector<BenchRow> bench_all_reduce(Communicator& comm,
                                       const std::vector<BenchContender>& contenders,
                                       const std::vector<size_t>& sizes, int iters,
                                       const std::function<void(const BenchRow&)>& on_row);

}  // namespace flotilla::comm
