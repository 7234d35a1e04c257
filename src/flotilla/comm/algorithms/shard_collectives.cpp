// ZeRO's reduce-scatter and all-gather (all_reduce.hpp): through the host's shared memory,
// and AllReducer's choice among those, the ring and the backend's own.
#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/algorithms/payload.hpp"

namespace flotilla::comm {
namespace {

void check_shm(const Communicator& comm, const HostGroups& groups) {
  if (!groups.shm || groups.topology.hosts != 1 || !groups.host || groups.host->size() != comm.size())
    throw Error("comm/shm", fmt::format("rank {}: the shared-memory reduce-scatter and all-gather need every rank "
                                        "on this host with the arena (HostGroups::split)",
                                        comm.rank()));
}

}  // namespace

std::string_view shard_algorithm_name(ShardAlgorithm a) {
  switch (a) {
    case ShardAlgorithm::ring: return "ring";
    case ShardAlgorithm::shm: return "shm";
    case ShardAlgorithm::backend: return "mpi";
  }
  return "?";
}

void shm_reduce_scatter(Communicator& comm, HostGroups& groups, MutView data, ReduceOp op, const Options& options) {
  check_shm(comm, groups);
  detail::run_signed_scatter(comm, "shm", data, op, options, [&](ReduceOp base, Clock::time_point deadline) {
    if (data.count() > 0) groups.shm->reduce_scatter(data, base, deadline);
  });
}

void shm_all_gather(Communicator& comm, HostGroups& groups, MutView data, const Options& options) {
  check_shm(comm, groups);
  detail::run_signed_gather(comm, "shm", data, options, [&](Clock::time_point deadline) {
    if (data.count() > 0) groups.shm->all_gather(data, deadline);
  });
}

// The configured all-reduce algorithm picks its kin: the backend's own for `mpi`, the ring
// for `ring` and `hd` (which has no halves of its own), the arena where it exists for
// `hier` and `auto`.
ShardAlgorithm AllReducer::shard_algorithm() const {
  switch (config_.algorithm) {
    case AllReduceAlgorithm::backend: return ShardAlgorithm::backend;
    case AllReduceAlgorithm::ring:
    case AllReduceAlgorithm::halving_doubling: return ShardAlgorithm::ring;
    case AllReduceAlgorithm::automatic:
    case AllReduceAlgorithm::hierarchical: break;
  }
  return groups_.topology.hosts == 1 && groups_.shm ? ShardAlgorithm::shm : ShardAlgorithm::ring;
}

void AllReducer::reduce_scatter(MutView data, ReduceOp op, const Options& options) {
  switch (shard_algorithm()) {
    case ShardAlgorithm::shm: return shm_reduce_scatter(comm_, groups_, data, op, options);
    case ShardAlgorithm::ring: return ring_reduce_scatter(comm_, data, op, options, config_.tuning);
    case ShardAlgorithm::backend: {
      // The backend reduces into a separate output: our chunk lands in the workspace first.
      const MutView mine = detail::own_chunk(comm_, data);
      std::byte* out = detail::scratch_bytes(config_.tuning, workspace_, mine.size_bytes());
      comm_.reduce_scatter(ConstView(data), MutView(std::span<std::byte>(out, mine.size_bytes()), mine.type(), mine.count()),
                           op, options);
      std::memcpy(mine.data(), out, mine.size_bytes());
      return;
    }
  }
}

void AllReducer::all_gather(MutView data, const Options& options) {
  switch (shard_algorithm()) {
    case ShardAlgorithm::shm: return shm_all_gather(comm_, groups_, data, options);
    case ShardAlgorithm::ring: return ring_all_gather(comm_, data, options, config_.tuning);
    case ShardAlgorithm::backend: {
      const MutView mine = detail::own_chunk(comm_, data);
      std::byte* in = detail::scratch_bytes(config_.tuning, workspace_, mine.size_bytes());
      std::memcpy(in, mine.data(), mine.size_bytes());
      comm_.all_gather(ConstView(std::span<const std::byte>(in, mine.size_bytes()), mine.type(), mine.count()), data,
                       options);
      return;
    }
  }
}

}  // namespace flotilla::comm
