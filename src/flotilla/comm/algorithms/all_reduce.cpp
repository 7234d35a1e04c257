// The chooser, the topology and AllReducer (all_reduce.hpp).
#include "flotilla/comm/algorithms/all_reduce.hpp"

#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/base/hash.hpp"

namespace flotilla::comm {

AlgorithmOptions AlgorithmOptions::resolve(const Communicator& comm) const {
  AlgorithmOptions r = *this;
  const bool one_host = comm.local_size() == comm.size();
  if (r.segment_bytes == 0) r.segment_bytes = one_host ? size_t{256} << 10 : size_t{60} << 10;
  if (r.window <= 0) r.window = one_host ? 8 : 16;
  return r;
}

std::string_view algorithm_flag(AllReduceAlgorithm a) {
  switch (a) {
    case AllReduceAlgorithm::automatic: return "auto";
    case AllReduceAlgorithm::ring: return "ring";
    case AllReduceAlgorithm::halving_doubling: return "hd";
    case AllReduceAlgorithm::hierarchical: return "hier";
    case AllReduceAlgorithm::backend: return "mpi";
  }
  return "?";
}

AllReduceAlgorithm parse_algorithm(std::string_view flag) {
  for (auto a : {AllReduceAlgorithm::automatic, AllReduceAlgorithm::ring,
                 AllReduceAlgorithm::halving_doubling, AllReduceAlgorithm::hierarchical,
                 AllReduceAlgorithm::backend})
    if (flag == algorithm_flag(a)) return a;
  if (flag == "backend") return AllReduceAlgorithm::backend;
  throw InputError("comm", fmt::format("unknown all-reduce algorithm '{}': choose auto, ring, hd, "
                                  "hier or mpi",
                                  flag));
}

Topology Topology::discover(Communicator& comm, int fake_ranks_per_host) {
  std::vector<uint64_t> host_of(static_cast<size_t>(comm.size()));  // (size) host index
  if (fake_ranks_per_host > 0) {
    for (int r = 0; r < comm.size(); ++r) host_of[r] = static_cast<uint64_t>(r / fake_ranks_per_host);
  } else {
    const std::vector<int64_t> mine = {static_cast<int64_t>(fnv1a64(comm.host_name()))};
    std::vector<int64_t> hashes(static_cast<size_t>(comm.size()));  // (size)
    comm.all_gather(mine, hashes, Options{.name = "topology"});
    std::map<int64_t, uint64_t> index;  // hash -> host index, by lowest rank
    for (int r = 0; r < comm.size(); ++r) {
      const auto [it, added] = index.emplace(hashes[r], index.size());
      host_of[r] = it->second;
    }
  }
  Topology t;
  t.host = static_cast<int>(host_of[comm.rank()]);
  t.hosts = static_cast<int>(*std::max_element(host_of.begin(), host_of.end())) + 1;
  std::vector<int> ranks(static_cast<size_t>(t.hosts), 0);  // (hosts) ranks per host
  for (uint64_t h : host_of) ++ranks[h];
  t.max_ranks_per_host = *std::max_element(ranks.begin(), ranks.end());
  return t;
}

HostGroups HostGroups::split(Communicator& comm, const Topology& topology, bool use_shm) {
  HostGroups g;
  g.topology = topology;
  g.host = comm.split(topology.host, comm.rank(), Options{.name = "host group"});
  g.leaders = comm.split(g.host->rank() == 0 ? 0 : -1, comm.rank(), Options{.name = "leaders"});
  if (use_shm && g.host->size() > 1) g.shm = HostShm::create(*g.host);
  return g;
}

// From `flotilla bench comm` (bench/RESULTS.md, bench/logs/): on 4 emulated 1 Gbit/s
// hosts halving-doubling beat the ring up to 64 KiB and lost from 128 KiB (its halves
// go as single large messages, which OpenMPI's TCP transport sends half-duplex); on 2 ranks
// of one machine it was level with or ahead of the ring up to 1 MiB, on 3 ranks level to
// 128 KiB. 64 KiB is the threshold that never picks the clearly slower one. Hierarchical
// pays off with several ranks on each of several hosts (one rank per host: it is the ring
// with an extra split), and on one host wherever the shared-memory arena exists: there it
// is the whole all-reduce, one copy in and one out per rank, against the ring's 2(n-1)
// messages through MPI's shared-memory transport. Measured on a quiet 2-core machine
// (bench/RESULTS.md): from 512 KiB up 1.2-1.9x faster than the ring on 2 ranks, 1.6-2.1x
// on 3, 1.5-3x on 4; below 512 KiB the ring is level or ahead on 2 ranks.
AllReduceAlgorithm choose_algorithm(size_t bytes, int world_size, const Topology& topology, bool host_arena) {
  constexpr size_t kSmallBytes = 64 << 10;
  constexpr size_t kArenaBytes = 512 << 10;
  if (world_size <= 1) return AllReduceAlgorithm::ring;  // nothing moves
  if (bytes < kSmallBytes) return AllReduceAlgorithm::halving_doubling;
  if (topology.hosts > 1 && topology.max_ranks_per_host > 1)
    return AllReduceAlgorithm::hierarchical;
  // One host: every rank has the arena or none has (HostShm::create agrees on it).
  if (topology.hosts == 1 && host_arena && bytes >= kArenaBytes) return AllReduceAlgorithm::hierarchical;
  return AllReduceAlgorithm::ring;
}

AllReducer::AllReducer(Communicator& comm, Config config)
    : comm_(comm),
      config_(config),
      groups_(HostGroups::split(comm, Topology::discover(comm, config.fake_ranks_per_host),
                                config.use_shm)) {
  config_.tuning.workspace = &workspace_;
}

AllReduceAlgorithm AllReducer::algorithm_for(size_t bytes) const {
  if (config_.algorithm != AllReduceAlgorithm::automatic) return config_.algorithm;
  return choose_algorithm(bytes, comm_.size(), groups_.topology, groups_.shm != nullptr);
}

void AllReducer::run(MutView data, ReduceOp op, const Options& options) {
  switch (algorithm_for(data.size_bytes())) {
    case AllReduceAlgorithm::automatic:
    case AllReduceAlgorithm::ring:
      return ring_all_reduce(comm_, data, op, options, config_.tuning);
    case AllReduceAlgorithm::halving_doubling:
      return halving_doubling_all_reduce(comm_, data, op, options, config_.tuning);
    case AllReduceAlgorithm::hierarchical:
      return hierarchical_all_reduce(comm_, groups_, data, op, options, config_.tuning);
    case AllReduceAlgorithm::backend:
      return comm_.all_reduce(data, op, options);
  }
}

}  // namespace flotilla::comm
