// flotilla's own all-reduce algorithms, built on the Communicator's point-to-point
// (isend/irecv), and the chooser that picks one per call:
//
//   ring               reduce-scatter then all-gather around the ring, chunked and
//                      pipelined (ring_all_reduce.cpp). Bandwidth-optimal: every rank
//                      sends and receives 2(n-1)/n of the buffer, both at once.
//   halving_doubling   recursive halving (reduce-scatter) then recursive doubling
//                      (all-gather), log2 steps; for small messages, where latency rules
//                      (halving_doubling_all_reduce.cpp). Any world size: the extra ranks
//                      of a non-power of two fold into a partner first.
//   hierarchical       reduce within each host, ring among the host leaders, broadcast
//                      within each host (hierarchical_all_reduce.cpp).
//   backend            the Communicator's own all_reduce (MPI_Iallreduce for MPI);
//                      `--allreduce mpi`.
//
// Every call is one signed collective on the communicator it is given (see
// Communicator::run_p2p_collective): ranks that disagree on the algorithm, the buffer or
// the operation get a MismatchError, and every wait ends by the collective's deadline.
// No globals: an AllReducer is a value bound to one communicator, usable from whichever
// one thread uses that communicator (a later communication thread reducing fusion buckets
// calls run() on sub-spans).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/comm/algorithms/host_shm.hpp"
#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

enum class AllReduceAlgorithm : uint8_t { automatic, ring, halving_doubling, hierarchical, backend };

// "auto", "ring", "hd", "hier", "mpi" (the backend's own; "mpi" is what users type).
std::string_view algorithm_flag(AllReduceAlgorithm a);
// The inverse of algorithm_flag; also accepts "backend". Throws InputError naming
// the choices.
AllReduceAlgorithm parse_algorithm(std::string_view flag);

// Tuning, and the test-only knobs that force the rare paths.
struct AlgorithmOptions {
  // Bytes per transfer (a *segment*): the ring and the intra-host chains pipeline in
  // segments, so a segment's reduction overlaps the next one's transfer. Tests set it
  // tiny to exercise many segments per chunk. 0: by where the ranks are (resolve()).
  size_t segment_bytes = 0;
  // Segments received ahead of the one being reduced (scratch = window x segment).
  // 0: by where the ranks are.
  int window = 0;

  // The defaults filled in for `comm`. All ranks on one host: 256 KiB segments, 8 ahead
  // (large copies through shared memory). Across hosts: 60 KiB, 16 ahead: below
  // OpenMPI's TCP eager limit (btl_tcp_eager_limit, 64 KiB with headers), so every
  // segment goes eagerly, in both directions at once, and no rendezvous reply queues
  // behind a large put fragment on the shared socket - the default settings' halving of
  // two-way throughput (docs/distributed.md). Measured in bench/RESULTS.md.
  AlgorithmOptions resolve(const Communicator& comm) const;
  // The tag every message of an algorithm carries; p2p users of the same communicator
  // must not use it while an algorithm runs.
  int tag = Communicator::kMaxTag;
  // Scratch memory kept across calls (it only grows); null: allocated per call. Fresh
  // pages cost a fault each, which a megabyte all-reduce on shared memory notices.
  // AllReducer keeps one per communicator.
  std::vector<std::byte>* workspace = nullptr;
};

// The algorithms themselves, in place, on any element type the Communicator reduces (sum
// or max; avg = sum then divide) and any length, 0 included. Collective over `comm`.
void ring_all_reduce(Communicator& comm, MutView data, ReduceOp op,
                     const Options& options = {}, const AlgorithmOptions& tuning = {});
void halving_doubling_all_reduce(Communicator& comm, MutView data, ReduceOp op,
                                 const Options& options = {},
                                 const AlgorithmOptions& tuning = {});

// Which ranks share a host: the hierarchical algorithm's groups.
struct Topology {
  int hosts = 1;            // distinct hosts in the communicator
  int host = 0;             // this rank's host, 0..hosts-1, numbered by lowest rank
  int max_ranks_per_host = 1;
  // The communicator's ranks grouped by host name (one all_gather of the names' hashes;
  // collective). `fake_ranks_per_host` > 0 instead groups consecutive ranks k at a time:
  // the test knob that gives the thread backend, or one machine, several "hosts".
  static Topology discover(Communicator& comm, int fake_ranks_per_host = 0);
};

// The hierarchical algorithm's sub-communicators, split once from `comm` (collective),
// and the host's shared-memory arena.
struct HostGroups {
  Topology topology;
  std::unique_ptr<Communicator> host;     // the ranks of this host; local rank 0 leads
  std::unique_ptr<Communicator> leaders;  // the hosts' leaders; null on the other ranks
  std::unique_ptr<HostShm> shm;           // null: alone on the host, or no arena possible
  static HostGroups split(Communicator& comm, const Topology& topology, bool use_shm = true);
};

// Signed once on `comm`; the payload moves inside the host through groups.shm (POSIX
// shared memory: reduce to the leader, broadcast from it), or, without an arena, along
// pipelined chains over the host group's point-to-point; between hosts over
// groups.leaders.
void hierarchical_all_reduce(Communicator& comm, HostGroups& groups, MutView data,
                             ReduceOp op, const Options& options = {},
                             const AlgorithmOptions& tuning = {});

// ZeRO's halves of an all-reduce, in place on data (size, n) of every rank (its count a
// multiple of the size; an Error otherwise):
//   reduce-scatter: chunk `rank` := the reduction of every rank's chunk `rank`; the other
//                   chunks are left as scratch (partial sums, or as they were);
//   all-gather:     chunk r := rank r's chunk r, for every r.
// Each is one signed collective named "<algorithm>:<options.name>", like the all-reduces.
//   ring  the ring all-reduce's two halves run alone: (n - 1)/n of the buffer each way;
//   shm   (one host) through the host's shared-memory arena, every rank reducing its own
//         chunk (HostShm::reduce_scatter / all_gather); groups from HostGroups::split.
void ring_reduce_scatter(Communicator& comm, MutView data, ReduceOp op, const Options& options = {},
                         const AlgorithmOptions& tuning = {});
void ring_all_gather(Communicator& comm, MutView data, const Options& options = {},
                     const AlgorithmOptions& tuning = {});
void shm_reduce_scatter(Communicator& comm, HostGroups& groups, MutView data, ReduceOp op,
                        const Options& options = {});
void shm_all_gather(Communicator& comm, HostGroups& groups, MutView data, const Options& options = {});

// How AllReducer reduce-scatters and all-gathers.
enum class ShardAlgorithm : uint8_t { ring, shm, backend };
std::string_view shard_algorithm_name(ShardAlgorithm a);  // "ring", "shm", "mpi"

// The chooser: which algorithm for `bytes` on `world_size` ranks over `topology`, where
// `host_arena` says the ranks of a host share a memory arena (HostGroups::shm).
// Thresholds measured on this project's machines (docs/distributed.md).
AllReduceAlgorithm choose_algorithm(size_t bytes, int world_size, const Topology& topology, bool host_arena = false);

// One communicator's all-reduce (and ZeRO's reduce-scatter and all-gather): discovers the
// topology and splits the host groups on construction (collective over comm), then runs
// the configured or chosen algorithm.
class AllReducer {
 public:
  struct Config {
    AllReduceAlgorithm algorithm = AllReduceAlgorithm::automatic;
    AlgorithmOptions tuning;
    int fake_ranks_per_host = 0;  // see Topology::discover
    bool use_shm = true;          // hierarchical: a shared-memory arena inside each host
  };

  explicit AllReducer(Communicator& comm) : AllReducer(comm, Config{}) {}
  AllReducer(Communicator& comm, Config config);
  // Pinned: its tuning points at its own workspace.
  AllReducer(const AllReducer&) = delete;
  AllReducer& operator=(const AllReducer&) = delete;

  // In place; every rank passes the same count, type and op.
  void run(MutView data, ReduceOp op, const Options& options = {});
  // What run() would use for a buffer of `bytes`.
  AllReduceAlgorithm algorithm_for(size_t bytes) const;
  // In place on data (size, n), as ring_reduce_scatter / ring_all_gather say. With the
  // algorithm automatic or hierarchical: through the host's arena when every rank is on
  // this host and has it, else the ring; ring and halving-doubling: the ring; backend
  // (`--allreduce mpi`): the backend's own collectives.
  void reduce_scatter(MutView data, ReduceOp op, const Options& options = {});
  void all_gather(MutView data, const Options& options = {});
  ShardAlgorithm shard_algorithm() const;
  const Topology& topology() const { return groups_.topology; }
  Communicator& communicator() { return comm_; }

 private:
  Communicator& comm_;
  Config config_;
  HostGroups groups_;
  std::vector<std::byte> workspace_;  // config_.tuning.workspace
};

}  // namespace flotilla::comm
