// The MPI backend. Every payload runs as MPI's nonblocking collective (MPI_Iallreduce,
// MPI_Ibcast, ...) completed by MPI_Test polling (poll_until), so every wait has a
// deadline; the blocking calls left are MPI_Comm_split and MPI_Comm_split_type, which
// have no nonblocking form and run only after a bounded exchange has shown that every
// rank is present.
//
// The mismatch check (Settings::check_mismatch, CheckProtocol) runs before the payload:
//   exchange: each rank sends its 64-byte Signature to every other (tag kCheckTag) and
//             receives theirs. Every rank then holds all signatures, so all throw the
//             same MismatchError; and on a timeout the receives still pending name the
//             late ranks. Cost: size - 1 small messages each way per rank.
//   hash:     one MPI_Iallreduce(MPI_MAX) of (hash, ~hash), i.e. max and min of the
//             hash in 16 bytes; only when they differ, an MPI_Iallgather of the
//             signatures builds the message. A timeout cannot name the late ranks.
// Either way the check synchronises the ranks, so barrier() is the check alone.
#include "flotilla/comm/mpi/mpi_communicator.hpp"

#include <algorithm>
#include <climits>
#include <vector>

#include <fmt/ranges.h>

#include "flotilla/base/log.hpp"
#include "flotilla/comm/mpi/mpi_util.hpp"

namespace flotilla::comm {
namespace {

constexpr int kCheckTag = Communicator::kMaxTag + 1;  // 32767, the least MPI_TAG_UB
constexpr size_t kMaxCount = INT_MAX;                 // MPI counts are int

MPI_Datatype mpi_type(ElementType type) {
  switch (type) {
    case ElementType::f32: return MPI_FLOAT;
    case ElementType::f64: return MPI_DOUBLE;
    case ElementType::f16:
    case ElementType::bf16: return MPI_UINT16_T;  // moved, never reduced
    case ElementType::i32: return MPI_INT32_T;
    case ElementType::u32: return MPI_UINT32_T;
    case ElementType::i64: return MPI_INT64_T;
    case ElementType::u8: return MPI_UINT8_T;
    case ElementType::i8: return MPI_INT8_T;
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::max ? MPI_MAX : MPI_SUM; }

// What the check exchanges. On the heap, and deliberately leaked when a timeout abandons
// an operation on it: MPI may still write here when the late rank finally arrives.
struct CheckBuffers {
  Signature mine;
  std::vector<Signature> by_rank;  // (size)
  uint64_t hash_pair[2] = {};      // (hash, ~hash)
  uint64_t agreed[2] = {};         // MPI_MAX of hash_pair: (max hash, ~min hash)
  std::vector<int32_t> split_table;  // (size, 3): color, key, node of every rank
};

// A point-to-point operation in flight, sent and received as bytes.
class MpiRequestOp final : public PendingOp {
 public:
  MpiRequestOp(MPI_Request request, size_t bytes, RequestInfo info)
      : PendingOp(std::move(info)), request_(request), bytes_(bytes) {}

  // Request::~Request has already cancelled or waited; what is left is an operation
  // that would not finish: free it so MPI forgets it (its buffer must outlive the job).
  ~MpiRequestOp() override {
    if (request_ != MPI_REQUEST_NULL && !mpi::finalized()) MPI_Request_free(&request_);
  }

  bool test() override {
    if (request_ == MPI_REQUEST_NULL) return true;
    int flag = 0;
    MPI_Status status;
    const int rc = MPI_Test(&request_, &flag, &status);
    if (rc != MPI_SUCCESS) {
      request_ = MPI_REQUEST_NULL;
      throw Error(info().component, fmt::format("rank {}: {}: MPI_Test failed: {}", info().rank,
                                                info().what, mpi::error_string(rc)));
    }
    if (!flag) return false;
    int cancelled = 0;
    MPI_Test_cancelled(&status, &cancelled);
    if (!info().is_send && !cancelled) {
      int received = 0;
      MPI_Get_count(&status, MPI_BYTE, &received);
      if (static_cast<size_t>(received) != bytes_)
        throw Error(info().component,
                    fmt::format("rank {}: {}: the message has {} bytes, the buffer {}",
                                info().rank, info().what, received, bytes_));
    }
    return true;
  }

  void cancel() override {
    if (request_ != MPI_REQUEST_NULL && !info().is_send) MPI_Cancel(&request_);
  }

 private:
  MPI_Request request_;
  size_t bytes_;
};

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm`; `node` identifies this rank's host (the lowest world rank
  // sharing its memory) so that split() can count local ranks without asking MPI again.
  MpiCommunicator(MPI_Comm comm, Identity identity, const Settings& settings, int node)
      : Communicator(std::move(identity), settings),
        comm_(comm),
        node_(node),
        check_(std::make_unique<CheckBuffers>()) {}

  ~MpiCommunicator() override {
    if (abandoned_) (void)check_.release();  // see CheckBuffers
    if (!mpi::finalized()) MPI_Comm_free(&comm_);
  }

  // MPI_COMM_WORLD, duplicated, with this rank's host and local rank.
  static std::unique_ptr<Communicator> world(const Settings& settings) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized || mpi::finalized())
      throw Error("comm/mpi", "MPI is not initialised: main must create an MpiRuntime before "
                              "make_world()");
    int world_rank = 0;
    mpi::check(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank), "MPI_Comm_rank", -1);

    // Our own copy of the world, so no other library's traffic can match ours.
    // Nonblocking and polled: a rank that never started shows up as a timeout, not a hang.
    MPI_Comm world = MPI_COMM_NULL;
    MPI_Request request;
    mpi::check(MPI_Comm_idup(MPI_COMM_WORLD, &world, &request), "MPI_Comm_idup", world_rank);
    int flag = 0;
    const bool done = poll_until(Clock::now() + settings.timeout, [&] {
      mpi::check(MPI_Test(&request, &flag, MPI_STATUS_IGNORE), "MPI_Comm_idup", world_rank);
      return flag != 0;
    }, Polling::patient);
    if (!done)
      throw TimeoutError("comm/mpi",
                         fmt::format("rank {}: creating the world communicator timed out after "
                                     "{}: some ranks never started",
                                     world_rank, format_seconds(settings.timeout)));
    mpi::check(MPI_Comm_set_errhandler(world, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler",
               world_rank);

    Identity identity{"mpi", world_rank, 1, 0, 1, {}};
    mpi::check(MPI_Comm_size(world, &identity.size), "MPI_Comm_size", world_rank);
    char host[MPI_MAX_PROCESSOR_NAME] = {};
    int host_bytes = 0;
    mpi::check(MPI_Get_processor_name(host, &host_bytes), "MPI_Get_processor_name", world_rank);
    identity.host_name.assign(host, static_cast<size_t>(host_bytes));

    // The ranks sharing this host's memory. MPI_Comm_split_type blocks, but every rank
    // has just completed the idup. The node's id is its lowest world rank.
    MPI_Comm node = MPI_COMM_NULL;
    mpi::check(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &node),
               "MPI_Comm_split_type", world_rank);
    mpi::check(MPI_Comm_rank(node, &identity.local_rank), "MPI_Comm_rank", world_rank);
    mpi::check(MPI_Comm_size(node, &identity.local_size), "MPI_Comm_size", world_rank);
    int node_id = world_rank;
    mpi::check(MPI_Iallreduce(&world_rank, &node_id, 1, MPI_INT, MPI_MIN, node, &request),
               "MPI_Iallreduce", world_rank);
    const bool agreed = poll_until(Clock::now() + settings.timeout, [&] {
      mpi::check(MPI_Test(&request, &flag, MPI_STATUS_IGNORE), "MPI_Iallreduce", world_rank);
      return flag != 0;
    });
    MPI_Comm_free(&node);
    if (!agreed)
      throw TimeoutError("comm/mpi", fmt::format("rank {}: finding the ranks of host {} timed "
                                                 "out after {}",
                                                 world_rank, identity.host_name,
                                                 format_seconds(settings.timeout)));
    log::debug("comm/mpi: rank {} of {} on {} (local rank {} of {})", identity.rank,
               identity.size, identity.host_name, identity.local_rank, identity.local_size);
    return std::make_unique<MpiCommunicator>(world, std::move(identity), settings, node_id);
  }

 protected:
  Request do_isend(ConstView data, int dest, int tag) override {
    require_int_count(data.size_bytes(), "send");
    MPI_Request request;
    check(MPI_Isend(data.data(), static_cast<int>(data.size_bytes()), MPI_BYTE, dest, tag, comm_,
                    &request),
          "MPI_Isend");
    return Request(std::make_unique<MpiRequestOp>(request, data.size_bytes(),
                                                  request_info(dest, true, tag, data)));
  }

  Request do_irecv(MutView data, int source, int tag) override {
    require_int_count(data.size_bytes(), "recv");
    MPI_Request request;
    check(MPI_Irecv(data.data(), static_cast<int>(data.size_bytes()), MPI_BYTE, source, tag,
                    comm_, &request),
          "MPI_Irecv");
    return Request(std::make_unique<MpiRequestOp>(request, data.size_bytes(),
                                                  request_info(source, false, tag, data)));
  }

  void do_all_reduce(const Collective& c, ConstView in, MutView out, ReduceOp op) override {
    agree(c);
    // A buffer of more than INT_MAX elements goes in slices (a 7B model's gradient has
    // more). Count 0 still makes one call, so that every rank takes part.
    const size_t element_bytes = element_size(in.type());
    size_t done = 0;
    do {
      const size_t n = std::min(in.count() - done, kMaxCount);
      const void* send = in.data() == out.data() ? MPI_IN_PLACE : in.data() + done * element_bytes;
      MPI_Request request;
      check(MPI_Iallreduce(send, out.data() + done * element_bytes, static_cast<int>(n),
                           mpi_type(in.type()), mpi_op(op), comm_, &request),
            "MPI_Iallreduce");
      complete(request, c, "MPI_Iallreduce");
      done += n;
    } while (done < in.count());
  }

  void do_broadcast(const Collective& c, MutView data, int root) override {
    agree(c);
    const size_t element_bytes = element_size(data.type());
    size_t done = 0;
    do {
      const size_t n = std::min(data.count() - done, kMaxCount);
      MPI_Request request;
      check(MPI_Ibcast(data.data() + done * element_bytes, static_cast<int>(n),
                       mpi_type(data.type()), root, comm_, &request),
            "MPI_Ibcast");
      complete(request, c, "MPI_Ibcast");
      done += n;
    } while (done < data.count());
  }

  void do_all_gather(const Collective& c, ConstView in, MutView out) override {
    require_int_count(in.count(), "all_gather");
    agree(c);
    MPI_Request request;
    check(MPI_Iallgather(in.data(), static_cast<int>(in.count()), mpi_type(in.type()), out.data(),
                         static_cast<int>(in.count()), mpi_type(in.type()), comm_, &request),
          "MPI_Iallgather");
    complete(request, c, "MPI_Iallgather");
  }

  void do_reduce_scatter(const Collective& c, ConstView in, MutView out, ReduceOp op) override {
    require_int_count(out.count(), "reduce_scatter");
    agree(c);
    MPI_Request request;
    check(MPI_Ireduce_scatter_block(in.data(), out.data(), static_cast<int>(out.count()),
                                    mpi_type(out.type()), mpi_op(op), comm_, &request),
          "MPI_Ireduce_scatter_block");
    complete(request, c, "MPI_Ireduce_scatter_block");
  }

  void do_all_to_all(const Collective& c, ConstView in, MutView out) override {
    const size_t chunk = in.count() / size();
    require_int_count(chunk, "all_to_all");
    agree(c);
    MPI_Request request;
    check(MPI_Ialltoall(in.data(), static_cast<int>(chunk), mpi_type(in.type()), out.data(),
                        static_cast<int>(chunk), mpi_type(in.type()), comm_, &request),
          "MPI_Ialltoall");
    complete(request, c, "MPI_Ialltoall");
  }

  void do_barrier(const Collective& c) override {
    if (c.check_mismatch && size() > 1) return agree(c);
    MPI_Request request;
    check(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier");
    complete(request, c, "MPI_Ibarrier");
  }

  // mpi_reference_all_reduce (mpi_communicator.hpp).
 public:
  void reference_all_reduce(MutView data, ReduceOp op) {
    if (op == ReduceOp::avg) fail("MPI_Allreduce reference: sum or max only");
    require_int_count(data.count(), "MPI_Allreduce reference");
    check(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.count()),
                        mpi_type(data.type()), mpi_op(op), comm_),
          "MPI_Allreduce");
  }

 protected:
  std::unique_ptr<Communicator> do_split(const Collective& c, int color, int key) override {
    agree(c);
    // Every rank's (color, key, node), gathered with a deadline: afterwards everyone is
    // known to be here, so MPI_Comm_split (blocking) cannot hang on an absent rank.
    CheckBuffers& b = *check_;
    const int32_t mine[3] = {color, key, node_};
    b.split_table.assign(3 * static_cast<size_t>(size()), 0);
    MPI_Request request;
    check(MPI_Iallgather(mine, 3, MPI_INT32_T, b.split_table.data(), 3, MPI_INT32_T, comm_,
                         &request),
          "MPI_Iallgather");
    complete(request, c, "MPI_Iallgather");
    MPI_Comm group = MPI_COMM_NULL;
    check(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &group),
          "MPI_Comm_split");
    if (color < 0) return nullptr;
    check(MPI_Comm_set_errhandler(group, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");

    Identity identity{"mpi", 0, 0, 0, 0, host_name()};
    check(MPI_Comm_rank(group, &identity.rank), "MPI_Comm_rank");
    check(MPI_Comm_size(group, &identity.size), "MPI_Comm_size");
    // Local rank: the members on this host, in the new group's order (key, then rank).
    std::vector<std::pair<int, int>> hosted;  // (key, old rank) of members on this node
    for (int r = 0; r < size(); ++r)
      if (b.split_table[3 * r] == color && b.split_table[3 * r + 2] == node_)
        hosted.push_back({b.split_table[3 * r + 1], r});
    std::sort(hosted.begin(), hosted.end());
    identity.local_size = static_cast<int>(hosted.size());
    identity.local_rank = static_cast<int>(
        std::find(hosted.begin(), hosted.end(), std::pair{key, rank()}) - hosted.begin());
    return std::make_unique<MpiCommunicator>(group, std::move(identity), settings(), node_);
  }

 private:
  void check(int rc, std::string_view call) const { mpi::check(rc, call, rank()); }

  void require_int_count(size_t count, std::string_view what) const {
    if (count > kMaxCount)
      fail(fmt::format("{}: {} elements per rank exceed MPI's int count; split the buffer",
                       what, count));
  }

  // Polls a nonblocking collective to completion or the deadline. A nonblocking
  // collective can be neither cancelled nor freed, so a timeout abandons it for good.
  void complete(MPI_Request& request, const Collective& c, std::string_view call) {
    int flag = 0;
    const bool done = poll_until(c.deadline, [&] {
      check(MPI_Test(&request, &flag, MPI_STATUS_IGNORE), call);
      return flag != 0;
    });
    if (done) return;
    abandoned_ = true;
    fail_timeout(c, c.check_mismatch
                        ? fmt::format("in {}; every rank had passed the mismatch check, so a "
                                      "rank stalled or died inside it", call)
                        : fmt::format("in {} (with the mismatch check off, which ranks are "
                                      "late is unknown)", call));
  }

  void agree(const Collective& c) {
    if (!c.check_mismatch || size() == 1) return;
    const CheckProtocol protocol = settings().protocol;
    if (protocol == CheckProtocol::exchange ||
        (protocol == CheckProtocol::automatic && size() <= 16))
      agree_by_exchange(c);
    else
      agree_by_hash(c);
  }

  void agree_by_exchange(const Collective& c) {
    CheckBuffers& b = *check_;
    b.mine = c.signature;
    b.by_rank.assign(size(), Signature{});
    b.by_rank[rank()] = c.signature;
    std::vector<MPI_Request> receives(size(), MPI_REQUEST_NULL);  // (size) from each rank
    std::vector<MPI_Request> sends(size(), MPI_REQUEST_NULL);     // (size) to each rank
    for (int r = 0; r < size(); ++r)
      if (r != rank())
        check(MPI_Irecv(&b.by_rank[r], sizeof(Signature), MPI_BYTE, r, kCheckTag, comm_,
                        &receives[r]),
              "MPI_Irecv");
    for (int r = 0; r < size(); ++r)
      if (r != rank())
        check(MPI_Isend(&b.mine, sizeof(Signature), MPI_BYTE, r, kCheckTag, comm_, &sends[r]),
              "MPI_Isend");
    const bool done = poll_until(c.deadline, [&] {
      int received = 0, sent = 0;
      check(MPI_Testall(size(), receives.data(), &received, MPI_STATUSES_IGNORE), "MPI_Testall");
      check(MPI_Testall(size(), sends.data(), &sent, MPI_STATUSES_IGNORE), "MPI_Testall");
      return received && sent;
    }, Polling::patient);
    if (!done) {
      std::vector<int> late;
      for (int r = 0; r < size(); ++r) {
        int flag = 1;
        if (receives[r] != MPI_REQUEST_NULL) MPI_Test(&receives[r], &flag, MPI_STATUS_IGNORE);
        if (flag) continue;
        late.push_back(r);
        MPI_Cancel(&receives[r]);
        MPI_Wait(&receives[r], MPI_STATUS_IGNORE);  // a cancelled receive completes locally
      }
      for (MPI_Request& send : sends)
        if (send != MPI_REQUEST_NULL) MPI_Request_free(&send);
      abandoned_ = true;
      fail_timeout(c, fmt::format("waiting for ranks [{}]", fmt::join(late, ", ")));
    }
    const std::string mismatch = find_mismatch(b.by_rank);
    if (!mismatch.empty()) throw MismatchError("comm", mismatch);
  }

  void agree_by_hash(const Collective& c) {
    CheckBuffers& b = *check_;
    b.hash_pair[0] = c.signature.hash;
    b.hash_pair[1] = ~c.signature.hash;
    MPI_Request request;
    check(MPI_Iallreduce(b.hash_pair, b.agreed, 2, MPI_UINT64_T, MPI_MAX, comm_, &request),
          "MPI_Iallreduce");
    complete_check(request, c, "MPI_Iallreduce");
    if (b.agreed[0] == ~b.agreed[1]) return;  // max hash == min hash
    b.mine = c.signature;
    b.by_rank.assign(size(), Signature{});
    check(MPI_Iallgather(&b.mine, sizeof(Signature), MPI_BYTE, b.by_rank.data(),
                         sizeof(Signature), MPI_BYTE, comm_, &request),
          "MPI_Iallgather");
    complete_check(request, c, "MPI_Iallgather");
    throw MismatchError("comm", find_mismatch(b.by_rank));
  }

  void complete_check(MPI_Request& request, const Collective& c, std::string_view call) {
    int flag = 0;
    const bool done = poll_until(c.deadline, [&] {
      check(MPI_Test(&request, &flag, MPI_STATUS_IGNORE), call);
      return flag != 0;
    }, Polling::patient);
    if (done) return;
    abandoned_ = true;
    fail_timeout(c, fmt::format("in the mismatch check ({}; the hash protocol cannot tell "
                                "which ranks are late)", call));
  }

  MPI_Comm comm_;
  int node_;
  std::unique_ptr<CheckBuffers> check_;
  bool abandoned_ = false;  // a timed-out operation may still write into check_
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_world(const Settings& settings) {
  return MpiCommunicator::world(settings);
}

bool is_mpi(const Communicator& comm) {
  return dynamic_cast<const MpiCommunicator*>(&comm) != nullptr;
}

void mpi_reference_all_reduce(Communicator& comm, MutView data, ReduceOp op) {
  auto* mpi = dynamic_cast<MpiCommunicator*>(&comm);
  if (!mpi) throw Error("comm/mpi", fmt::format("MPI_Allreduce reference: a {} communicator "
                                                "is not MPI (run under mpirun)",
                                                comm.backend()));
  mpi->reference_all_reduce(data, op);
}

}  // namespace flotilla::comm
