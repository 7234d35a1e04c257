// Hierarchical all-reduce: for several hosts with several ranks each, where links inside
// a host are much faster than between hosts and only one rank per host should use the
// network.
//
// Vocabulary. A *host group* is the ranks of one host (HostGroups::host), local rank 0
// its *leader*; the *leaders' group* joins the leaders (HostGroups::leaders). A host's
// *chain* runs local rank L-1 -> L-2 -> .. -> 0 (reduce) and 0 -> 1 -> .. -> L-1
// (broadcast); the buffer moves along it in *segments*, pipelined, so every link of the
// chain is busy at once and a segment costs one hop of latency, not L.
//
//   1. reduce:     the leader ends with the host's sum (through the host's arena, or
//                  along the chain: each rank adds its buffer into what it receives from
//                  above and passes the sum down);
//   2. ring:       the leaders run the ring all-reduce (ring_all_reduce.cpp) among them;
//   3. broadcast:  every rank gets the leader's result (through the arena, or along the
//                  chain: each rank lands a segment and passes it on).
//
// Intra-host stages go through the host's POSIX shared-memory arena (host_shm.hpp):
// each rank copies its segments in, the leader adds them up, and copies the result out
// for the others. Where no arena could be made (AllReducer::Config::use_shm off, or the
// ranks of a "host" are not on one machine), they run as chains over the host group's
// point-to-point instead (under MPI: its shared-memory transport, vader).
//
// The whole call is one signed collective on the parent communicator; the host and
// leaders' groups carry only payload, with the parent's deadline.
#include <fmt/format.h>

#include <vector>

#include "flotilla/comm/algorithms/payload.hpp"

namespace flotilla::comm {
namespace detail {
namespace {

// What a chain stage has in flight, owned by chain_stage so that a throw abandons the
// requests (payload.hpp) while the scratch they may land in is still alive.
struct InFlight {
  std::vector<std::byte> scratch;  // (window, slot) reduce landing
  std::vector<Request> sends;
  std::vector<Request> receives;
};

struct Segments {
  size_t elems;  // per segment
  size_t n;
  size_t count() const { return n == 0 ? 0 : (n + elems - 1) / elems; }
  Slice operator[](size_t k) const { return {k * elems, std::min(elems, n - k * elems)}; }
};

// Sums the host's buffers into its leader's (local rank 0), along the chain.
void chain_reduce_body(Communicator& host, MutView data, ReduceOp op,
                       const AlgorithmOptions& tuning, Clock::time_point deadline,
                       InFlight& f) {
  auto& [scratch, sends, receives] = f;
  const int l = host.rank(), size = host.size(), tag = tuning.tag;
  if (size == 1) return;
  const size_t element_bytes = element_size(data.type());
  const Segments segs{std::max<size_t>(1, tuning.segment_bytes / element_bytes), data.count()};
  const size_t window = static_cast<size_t>(std::max(1, tuning.window));
  if (l == size - 1) {  // the top of the chain only sends
    for (size_t k = 0; k < segs.count(); ++k)
      sends.push_back(host.isend(ConstView(sub_view(data, segs[k])), l - 1, tag));
    wait_all_until(sends, deadline);
    return;
  }
  const size_t slot_elems = std::min(segs.elems, data.count());
  scratch.resize(window * slot_elems * element_bytes);
  receives.resize(segs.count());
  auto slot = [&](size_t k) {
    return MutView(std::span<std::byte>(scratch.data() + (k % window) * slot_elems * element_bytes,
                                        segs[k].count * element_bytes),
                   data.type(), segs[k].count);
  };
  size_t posted = 0;
  for (size_t k = 0; k < segs.count(); ++k) {
    for (; posted < segs.count() && posted < k + window; ++posted)
      receives[posted] = host.irecv(slot(posted), l + 1, tag);
    wait_until(receives[k], deadline);
    reduce_into(data.type(), op, data.data() + segs[k].begin * element_bytes, slot(k).data(),
                segs[k].count);
    if (l > 0) sends.push_back(host.isend(ConstView(sub_view(data, segs[k])), l - 1, tag));
  }
  wait_all_until(sends, deadline);
}

// Copies the leader's buffer to every rank of the host, along the chain.
void chain_broadcast_body(Communicator& host, MutView data, const AlgorithmOptions& tuning,
                          Clock::time_point deadline, InFlight& f) {
  auto& [scratch, sends, receives] = f;
  (void)scratch;
  const int l = host.rank(), size = host.size(), tag = tuning.tag;
  if (size == 1) return;
  const size_t element_bytes = element_size(data.type());
  const Segments segs{std::max<size_t>(1, tuning.segment_bytes / element_bytes), data.count()};
  const size_t window = static_cast<size_t>(std::max(1, tuning.window));
  receives.resize(segs.count());
  size_t posted = 0;
  for (size_t k = 0; k < segs.count(); ++k) {
    if (l > 0) {
      for (; posted < segs.count() && posted < k + window; ++posted)
        receives[posted] = host.irecv(sub_view(data, segs[posted]), l - 1, tag);
      wait_until(receives[k], deadline);
    }
    if (l < size - 1) sends.push_back(host.isend(ConstView(sub_view(data, segs[k])), l + 1, tag));
  }
  wait_all_until(sends, deadline);
}

// Runs a chain stage; what is pending when it throws is abandoned (payload.hpp).
template <class Body>
void chain_stage(Body&& body) {
  InFlight f;
  try {
    body(f);
  } catch (...) {
    abandon_all(f.receives);
    abandon_all(f.sends);
    throw;
  }
}

void chain_reduce(Communicator& host, MutView data, ReduceOp op, const AlgorithmOptions& tuning,
                  Clock::time_point deadline) {
  chain_stage([&](InFlight& f) { chain_reduce_body(host, data, op, tuning, deadline, f); });
}

void chain_broadcast(Communicator& host, MutView data, const AlgorithmOptions& tuning,
                     Clock::time_point deadline) {
  chain_stage([&](InFlight& f) { chain_broadcast_body(host, data, tuning, deadline, f); });
}

}  // namespace
}  // namespace detail

void hierarchical_all_reduce(Communicator& comm, HostGroups& groups, MutView data, ReduceOp op,
                             const Options& options, const AlgorithmOptions& tuning) {
  if (!groups.host || (groups.host->rank() == 0) != (groups.leaders != nullptr))
    throw Error("comm/hier", fmt::format("rank {}: the host groups were not split from this "
                                         "communicator (HostGroups::split)",
                                         comm.rank()));
  // The chains stay on one host; the leaders' ring crosses hosts (resolve()).
  const AlgorithmOptions local = tuning.resolve(*groups.host);
  const AlgorithmOptions network =
      groups.leaders ? tuning.resolve(*groups.leaders) : AlgorithmOptions{};
  detail::run_signed(comm, "hier", data, op, options,
                     [&](ReduceOp base, Clock::time_point deadline) {
                       if (comm.size() == 1 || data.count() == 0) return;
                       if (groups.shm)
                         groups.shm->reduce_to_leader(data, base, deadline);
                       else
                         detail::chain_reduce(*groups.host, data, base, local, deadline);
                       if (groups.leaders)
                         detail::ring_payload(*groups.leaders, data, base, network, deadline);
                       if (groups.shm)
                         groups.shm->broadcast_from_leader(data, deadline);
                       else
                         detail::chain_broadcast(*groups.host, data, local, deadline);
                     });
}

}  // namespace flotilla::comm
