// What the algorithm files share: the payload stages without the signing (so that the
// hierarchical algorithm, signed once on the whole communicator, can run a ring on the
// leaders' group), element ranges, and deadline-bounded waits. Internal to algorithms/.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "flotilla/comm/algorithms/all_reduce.hpp"

namespace flotilla::comm::detail {

// Elements [begin, begin + count) of a buffer.
struct Slice {
  size_t begin = 0;
  size_t count = 0;
};

// Chunk c of n elements cut into p near-equal chunks: the first n % p chunks hold one
// element more. Every rank computes the same cut, so sender and receiver agree on sizes.
inline Slice chunk_of(size_t n, int p, int c) {
  const size_t base = n / static_cast<size_t>(p), extra = n % static_cast<size_t>(p);
  const size_t uc = static_cast<size_t>(c);
  return {uc * base + std::min(uc, extra), base + (uc < extra ? 1 : 0)};
}

inline MutView sub_view(MutView v, Slice s) {
  const size_t bytes = element_size(v.type());
  return MutView(std::span<std::byte>(v.data() + s.begin * bytes, s.count * bytes), v.type(),
                 s.count);
}

// The time left before `deadline`, for Request::wait (0 still tests once).
inline milliseconds time_left(Clock::time_point deadline) {
  const auto left = deadline - Clock::now();
  return left <= Clock::duration::zero()
             ? milliseconds(0)
             : std::chrono::ceil<milliseconds>(left);
}

// Requests left pending when an algorithm throws (a timeout, a peer's wrong size) are
// abandoned, not waited for: the caller's deadline has passed already.
inline void abandon_all(std::span<Request> rs) noexcept {
  for (Request& r : rs) r.abandon();
}

inline void wait_until(Request& r, Clock::time_point deadline) {
  try {
    r.wait(time_left(deadline));
  } catch (...) {
    r.abandon();
    throw;
  }
}
inline void wait_all_until(std::span<Request> rs, Clock::time_point deadline) {
  try {
    wait_all(rs, time_left(deadline));
  } catch (...) {
    abandon_all(rs);
    throw;
  }
}

// `bytes` of scratch: the caller's workspace when it has one (grown, never shrunk),
// else `own`.
inline std::byte* scratch_bytes(const AlgorithmOptions& tuning, std::vector<std::byte>& own,
                                size_t bytes) {
  std::vector<std::byte>& v = tuning.workspace ? *tuning.workspace : own;
  if (v.size() < bytes) v.resize(bytes);
  return v.data();
}

// The payloads, unsigned: op is sum or max; every rank of `comm` calls them alike.
void ring_payload(Communicator& comm, MutView data, ReduceOp op, const AlgorithmOptions& tuning,
                  Clock::time_point deadline);
void halving_doubling_payload(Communicator& comm, MutView data, ReduceOp op,
                              const AlgorithmOptions& tuning, Clock::time_point deadline);
// The ring's halves alone, on data (size, n): chunk `rank` ends reduced / starts as ours.
void ring_reduce_scatter_payload(Communicator& comm, MutView data, ReduceOp op, const AlgorithmOptions& tuning,
                                 Clock::time_point deadline);
void ring_all_gather_payload(Communicator& comm, MutView data, const AlgorithmOptions& tuning,
                             Clock::time_point deadline);

// Signs one all_reduce named `algorithm` on comm, runs payload(deadline) with avg turned
// into sum, then divides for avg. Checks that the reduction is supported.
void run_signed(Communicator& comm, std::string_view algorithm, MutView data, ReduceOp op,
                const Options& options,
                const std::function<void(ReduceOp, Clock::time_point)>& payload);
// The same for the in-place reduce-scatter and all-gather of data (size, n): signed with n,
// the count per rank; an Error when data does not cut into size equal chunks.
void run_signed_scatter(Communicator& comm, std::string_view algorithm, MutView data, ReduceOp op,
                        const Options& options, const std::function<void(ReduceOp, Clock::time_point)>& payload);
void run_signed_gather(Communicator& comm, std::string_view algorithm, MutView data, const Options& options,
                       const std::function<void(Clock::time_point)>& payload);
// Chunk `rank` of data (size, n).
MutView own_chunk(const Communicator& comm, MutView data);

}  // namespace flotilla::comm::detail
