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
//
// The reduce-scatter and all-gather (ZeRO's) have no leader: every rank publishes into
// slots of its own in a second region (*scatter slots*, so the two families never wait on
// each other's counters), and every rank reads what it needs from everyone's. A segment
// there is N *pieces*, piece j from chunk j of the rank's buffer (size, n); rank r sums
// piece r of every rank's slot, in rank order, so the result does not depend on who
// published first; for the all-gather a segment is one piece, the rank's own chunk's. Counters: shared[l] (rank l's last published segment) and
// read[l] (the last segment rank l has read from everyone); a rank rewrites its slot once
// every rank has read the segment two before.
//
// Waiting. A wait polls its counter briefly, then sleeps on the header's *doorbell* (a
// futex word shared by the processes); a rank that publishes a counter while anyone sleeps
// rings it. Every sleep is bounded by the caller's deadline, so a lost peer is a
// TimeoutError in bounded time, as with polling.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

class HostShm {
 public:
  static constexpr size_t kSegmentBytes = size_t{256} << 10;
  // A scatter slot: every segment is a handoff between all the ranks, so fewer, larger
  // ones keep them from waiting on each other's scheduling (measured: bench/RESULTS.md).
  static constexpr size_t kScatterSlotBytes = size_t{1} << 20;
  static constexpr int kMaxRanks = 64;  // per host

  // Collective over `host` (the ranks of one host; local rank 0 leads). The leader
  // creates the arena and names it; the others map it; the name is unlinked once all
  // have it, so nothing outlives the processes. Returns null on every rank when any rank
  // could not map it (the ranks are not on one machine, /dev/shm is missing or full):
  // the caller then uses point-to-point instead.
  static std::unique_ptr<HostShm> create(Communicator& host);
  // The arena's size for `ranks` ranks on a host (each maps all of it), and the parts of it
  // a rank touches, which its resident memory counts (plan/strategy.hpp charges them):
  //   all_reduce_bytes  the leader's share of the all-reduce stages: every other rank's two
  //                     slots and the two result slots (another rank touches 4 segments);
  //   scatter_bytes     the reduce-scatter and all-gather (ZeRO's): every rank's two
  //                     scatter slots, all read by every rank.
  static size_t arena_bytes(int ranks);
  static size_t all_reduce_bytes(int ranks) { return static_cast<size_t>(ranks) * 2 * kSegmentBytes; }
  static size_t scatter_bytes(int ranks) { return static_cast<size_t>(ranks) * 2 * kScatterSlotBytes; }
  ~HostShm();
  HostShm(const HostShm&) = delete;
  HostShm& operator=(const HostShm&) = delete;

  // The leader's data := the sum (or max) of every local rank's data; the others' data
  // is left as it was. op is sum or max.
  void reduce_to_leader(MutView data, ReduceOp op, Clock::time_point deadline);
  // Every rank's data := the leader's.
  void broadcast_from_leader(MutView data, Clock::time_point deadline);
  // data (size, n) on every rank: chunk `rank` := the sum (or max) of every rank's chunk
  // `rank`, in rank order; the other chunks are left as they were. n = count / size.
  void reduce_scatter(MutView data, ReduceOp op, Clock::time_point deadline);
  // data (size, n): chunk r := rank r's chunk r, for every r.
  void all_gather(MutView data, Clock::time_point deadline);

 private:
  HostShm(int rank, int size, std::byte* base, size_t bytes);
  uint64_t& counter(size_t index);  // the header's counters, see the file comment
  std::byte* slot(int rank, uint64_t segment);
  std::byte* result(uint64_t segment);
  std::byte* scatter_slot(int rank, uint64_t segment);
  // One segment of the scatter slots: elements [offset, offset + count) of each chunk, in
  // pieces of `piece_elems`. With `reduce`, every chunk goes in and ours comes out
  // reduced; without, ours goes in (piece 0) and every other comes out.
  void exchange_segment(MutView data, std::optional<ReduceOp> reduce, size_t piece_elems, size_t offset,
                        size_t count, Clock::time_point deadline);
  uint32_t& doorbell();  // the futex word sleepers wait on
  uint32_t& sleepers();  // how many ranks sleep on it, or are about to
  // counter(index) := value, and the doorbell rung when someone sleeps.
  void publish(size_t index, uint64_t value);
  // Until done() (polling, then sleeping on the doorbell), or a TimeoutError at `deadline`.
  template <class Done>
  void wait(Clock::time_point deadline, const char* what, Done&& done);

  int rank_;
  int size_;
  std::byte* base_;
  size_t bytes_;
  uint64_t reduced_ = 0;    // segments reduced so far, over all calls
  uint64_t broadcast_ = 0;  // segments broadcast so far
  uint64_t scattered_ = 0;  // segments through the scatter slots so far
};

}  // namespace flotilla::comm
