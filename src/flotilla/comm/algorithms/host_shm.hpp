// A POSIX shared-memory arena among the ranks of one host, for the hierarchical
// all-reduce's intra-host stages: reduce to the leader and broadcast from it without going
// through the MPI transport.
//
// Vocabulary. The buffer moves in *segments* of kSegmentBytes. Each rank has two *slots*
// (double buffering: segment s uses slot s % 2) where it publishes its segment for the
// leader; the leader has two *result* slots for the broadcast. Progress is told by
// monotonic counters in the arena's header, one writer each: published[l] (rank l's last
// published segment), consumed (the leader's last reduced one), ready (the leader's last
// broadcast one), taken[l] (rank l's last copied-out one). Segments are numbered across
// calls, so the counters never reset. A slot is rewritten only when its reader has moved
// two segments on; every wait polls a counter until the caller's deadline.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

class HostShm {
 public:
  static constexpr size_t kSegmentBytes = size_t{256} << 10;
  static constexpr int kMaxRanks = 64;  // per host

  // Collective over `host` (the ranks of one host; local rank 0 leads). The leader
  // creates the arena and names it; the others map it; the name is unlinked once all
  // have it, so nothing outlives the processes. Returns null on every rank when any rank
  // could not map it (the ranks are not on one machine, /dev/shm is missing or full):
  // the caller then uses point-to-point instead.
  static std::unique_ptr<HostShm> create(Communicator& host);
  ~HostShm();
  HostShm(const HostShm&) = delete;
  HostShm& operator=(const HostShm&) = delete;

  // The leader's data := the sum (or max) of every local rank's data; the others' data
  // is left as it was. op is sum or max.
  void reduce_to_leader(MutView data, ReduceOp op, Clock::time_point deadline);
  // Every rank's data := the leader's.
  void broadcast_from_leader(MutView data, Clock::time_point deadline);

 private:
  HostShm(int rank, int size, std::byte* base, size_t bytes);
  uint64_t& counter(size_t index);  // the header's counters, see the file comment
  std::byte* slot(int rank, uint64_t segment);
  std::byte* result(uint64_t segment);
  template <class Done>
  void wait(Clock::time_point deadline, const char* what, Done&& done);

  int rank_;
  int size_;
  std::byte* base_;
  size_t bytes_;
  uint64_t reduced_ = 0;    // segments reduced so far, over all calls
  uint64_t broadcast_ = 0;  // segments broadcast so far
};

}  // namespace flotilla::comm
