// The Communicator: one small group interface (after MLX's distributed Group), one
// folder per backend below this one:
//   local/   size 1, the fallback: single-process code needs no special case
//   thread/  N ranks as threads of one process, for fast tests of algorithms
//   mpi/     processes launched by mpirun or srun (Debian's OpenMPI)
// make_world() (world.hpp) picks local or MPI.
//
// Every collective, on every backend:
//   - is numbered (#1, #2, ... per communicator) and, unless Settings::check_mismatch is
//     off, first agrees with the other ranks on what is being run (signature.hpp): ranks
//     that call different collectives get a MismatchError, never a hang or corruption;
//   - is bounded by a deadline (Options::timeout, default Settings::timeout): a silent
//     peer gives a TimeoutError naming it where the backend can tell, and leaves the
//     communicator unusable (and, for MPI, the job to be aborted by main: see errors.hpp).
// Library code throws; it never exits or aborts.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "flotilla/comm/buffer_view.hpp"
#include "flotilla/comm/errors.hpp"
#include "flotilla/comm/reduce.hpp"
#include "flotilla/comm/request.hpp"
#include "flotilla/comm/signature.hpp"

namespace flotilla::comm {

// How MPI ranks agree on a collective before running it (mpi_communicator.cpp).
enum class CheckProtocol : uint8_t {
  automatic,  // exchange up to 16 ranks, hash beyond
  exchange,   // every rank sends its 64-byte signature to every other: names the late
              // ranks on a timeout; size - 1 messages each way per rank
  hash,       // one 16-byte all-reduce of (max, min) of the hash; signatures are gathered
              // only when they differ; a timeout cannot say which ranks are late
};

// Per communicator; split() hands them on to the sub-groups. Every rank must use the same
// (ranks that check differently cannot agree, and time out).
struct Settings {
  milliseconds timeout{std::chrono::seconds(300)};  // of every collective and wait
  bool check_mismatch = true;
  CheckProtocol protocol = CheckProtocol::automatic;
};

struct Options {
  std::string_view name = {};  // what is moved ("grads"): part of the signature and errors
  std::optional<milliseconds> timeout = {};  // default: Settings::timeout
};

class Communicator {
 public:
  // Largest tag for send/recv (MPI guarantees at least 32767; the last one is comm's).
  static constexpr int kMaxTag = 32766;

  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }  // among the ranks on this host
  int local_size() const { return local_size_; }
  const std::string& host_name() const { return host_name_; }
  std::string_view backend() const { return backend_; }  // "local", "thread", "mpi"

  const Settings& settings() const { return settings_; }
  void set_settings(const Settings& settings) { settings_ = settings; }
  // Collectives started on this communicator: the last one's number.
  uint64_t collectives_started() const { return seq_; }

  // --- point to point. `tag` in [0, kMaxTag]; a receive must get exactly its size.
  void send(ConstView data, int dest, int tag, const Options& options = {});
  void recv(MutView data, int source, int tag, const Options& options = {});
  [[nodiscard]] Request isend(ConstView data, int dest, int tag);
  [[nodiscard]] Request irecv(MutView data, int source, int tag);

  // --- collectives. Every rank passes the same counts, type, op and root. Buffer shapes:
  // n elements unless noted; (size, n) is size chunks of n, chunk r for or from rank r.
  void all_reduce(MutView data, ReduceOp op, const Options& options = {});  // in place
  void all_reduce(ConstView in, MutView out, ReduceOp op, const Options& options = {});
  void broadcast(MutView data, int root, const Options& options = {});
  // in: (n); out: (size, n), chunk r = rank r's in.
  void all_gather(ConstView in, MutView out, const Options& options = {});
  // in: (size, n); out: (n) = chunk `rank` of the reduction of every rank's in.
  void reduce_scatter(ConstView in, MutView out, ReduceOp op, const Options& options = {});
  // in, out: (size, n); out chunk r = chunk `rank` of rank r's in.
  void all_to_all(ConstView in, MutView out, const Options& options = {});
  void barrier(const Options& options = {});
  // Ranks passing the same color >= 0 form a sub-group, ordered by (key, rank); a
  // negative color takes part but returns nullptr (MPI_Comm_split's MPI_UNDEFINED).
  std::unique_ptr<Communicator> split(int color, int key, const Options& options = {});

  // --- collectives built above the backends out of send/recv (comm/algorithms/). Every
  // rank calls it alike. It is numbered and checked like any other collective: one
  // signature per call, agreed before body moves any data, whose name is
  // "<algorithm>:<options.name>" (ranks running different algorithms, or one rank this and
  // another the backend's own collective, get a MismatchError). Then body(deadline) runs;
  // its every wait must end by `deadline`. A TimeoutError out of body leaves this
  // communicator unusable, as a backend's timeout does.
  void run_p2p_collective(CollectiveKind kind, std::string_view algorithm,
                          const Options& options, uint64_t count, ElementType type,
                          ReduceOp op, const std::function<void(Clock::time_point)>& body);

 protected:
  struct Identity {
    std::string backend;
    int rank = 0;
    int size = 1;
    int local_rank = 0;
    int local_size = 1;
    std::string host_name;
  };

  // A collective about to run: what every rank must agree on, and its deadline.
  struct Collective {
    Signature signature;
    milliseconds timeout{0};
    Clock::time_point deadline;
    bool check_mismatch = true;
    std::string label() const;  // "all_reduce #42 (grads)"
  };

  Communicator(Identity identity, const Settings& settings);

  // "comm/<backend>"; errors read "[comm/mpi] rank 2: ...".
  const std::string& component() const { return component_; }
  [[noreturn]] void fail(std::string_view what) const;
  [[noreturn]] void fail_timeout(const Collective& c, std::string_view why) const;
  RequestInfo request_info(int peer, bool is_send, int tag, ConstView data) const;

  // Backends. Arguments are validated; reductions get sum or max only (averages are
  // divided here); `in` and `out` are either the same memory (in place) or disjoint.
  virtual Request do_isend(ConstView data, int dest, int tag) = 0;
  virtual Request do_irecv(MutView data, int source, int tag) = 0;
  virtual void do_all_reduce(const Collective& c, ConstView in, MutView out, ReduceOp op) = 0;
  virtual void do_broadcast(const Collective& c, MutView data, int root) = 0;
  virtual void do_all_gather(const Collective& c, ConstView in, MutView out) = 0;
  virtual void do_reduce_scatter(const Collective& c, ConstView in, MutView out,
                                 ReduceOp op) = 0;
  virtual void do_all_to_all(const Collective& c, ConstView in, MutView out) = 0;
  virtual void do_barrier(const Collective& c) = 0;
  virtual std::unique_ptr<Communicator> do_split(const Collective& c, int color, int key) = 0;

 private:
  Collective begin(CollectiveKind kind, const Options& options, uint64_t count,
                   ElementType type, int root, ReduceOp reduce);
  template <class Run>
  void run(const Collective& c, Run&& body);
  void check_peer(int peer, int tag, std::string_view what) const;
  void check_reduction(CollectiveKind kind, ElementType type, ReduceOp op) const;

  std::string backend_;
  std::string component_;
  int rank_;
  int size_;
  int local_rank_;
  int local_size_;
  std::string host_name_;
  Settings settings_;
  uint64_t seq_ = 0;
  std::string broken_;  // why this communicator can no longer be used (after a timeout)
};

}  // namespace flotilla::comm
