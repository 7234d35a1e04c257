// Ring all-reduce (after gloo's allreduce_ring_chunked), chunked and pipelined.
//
// Vocabulary. The buffer of n elements is cut into p *chunks*, one per rank (chunk_of:
// sizes differ by at most one element, some may be empty). A chunk moves in *segments*
// of at most AlgorithmOptions::segment_bytes: the unit of one send/recv. A *stage* is one
// step around the ring: every rank sends one chunk to its next rank and receives one
// chunk from its previous rank, segment by segment. There are 2(p-1) stages:
//
//   reduce-scatter, stage s = 0..p-2:   send chunk (r-s), receive chunk (r-s-1) and add
//                                        it into our own; after the last, chunk (r+1) is
//                                        fully reduced on rank r;
//   all-gather, stage p-1+t, t=0..p-2:  send chunk (r+1-t), receive chunk (r-t) into
//                                        place.
//
// What rank r receives in stage i is exactly what it sends in stage i+1, so the ring is
// one pipeline: a received segment is reduced (or landed) and forwarded at once, without
// waiting for the rest of its chunk. Every send is non-blocking and receives are posted
// `window` segments ahead, so a rank sends and receives at the same time (the link is
// used in both directions), and adding one segment overlaps the transfer of the next.
//
// Plan first, then run: the receive order (stage, segment) is listed before any
// transfer; both ends of a link derive it from the same chunk cut, so sizes always match
// and one tag suffices (MPI and the thread backend keep order per peer and tag).
//
// One hazard, handled where receives are posted: all-gather stage t lands chunk (r-t)
// in place, and reduce-scatter stage t *sent* chunk (r-t) from the same memory. The
// receive is posted only after those sends completed (they have arrived by then: the
// data we are about to receive went around the ring after them).
//
// Either half runs alone too (ZeRO's reduce-scatter of gradients and all-gather of
// weights), with the chunks numbered one lower, so that rank r ends the reduce-scatter
// holding chunk r, and starts the all-gather from chunk r: the stages of the other half are
// simply not run, and the hazard above cannot arise.
#include <string>
#include <vector>

#include <fmt/format.h>

#include "flotilla/comm/algorithms/payload.hpp"

namespace flotilla::comm {
namespace detail {
namespace {

// Which stages run: both halves (an all-reduce) or one.
enum class Halves : uint8_t { both, reduce_scatter, all_gather };

class Ring {
 public:
  Ring(Communicator& comm, MutView data, ReduceOp op, const AlgorithmOptions& tuning,
       Clock::time_point deadline, Halves halves = Halves::both)
      : comm_(comm),
        data_(data),
        op_(op),
        p_(comm.size()),
        r_(comm.rank()),
        next_((r_ + 1) % p_),
        prev_((r_ + p_ - 1) % p_),
        element_bytes_(element_size(data.type())),
        segment_elems_(std::max<size_t>(1, tuning.segment_bytes / element_bytes_)),
        window_(std::max(1, tuning.window)),
        tag_(tuning.tag),
        deadline_(deadline),
        stages_(2 * (p_ - 1)),
        first_(halves == Halves::all_gather ? p_ - 1 : 0),
        last_(halves == Halves::reduce_scatter ? p_ - 1 : stages_),
        shift_(halves == Halves::both ? 0 : -1),
        sends_(static_cast<size_t>(stages_)),
        sends_done_(static_cast<size_t>(stages_), false) {
    plan();
    // A slot holds one segment, and no segment outgrows the largest chunk: a small
    // buffer gets a small scratch (allocating megabytes per call costs more than a 4 KiB
    // all-reduce).
    slot_elems_ = std::min(segment_elems_, chunk_of(data.count(), p_, 0).count);
    scratch_ = scratch_bytes(tuning, own_scratch_,
                             static_cast<size_t>(window_) * slot_elems_ * element_bytes_);
  }

  void run() {
    try {
      stream();
    } catch (...) {
      for (Transfer& t : receives_) t.request.abandon();
      for (auto& stage : sends_) abandon_all(stage);
      throw;
    }
  }

 private:
  void stream() {
    post_sends_of_first_stage();
    for (next_consume_ = 0; next_consume_ < receives_.size(); ++next_consume_) {
      post_receives();
      Transfer& t = receives_[next_consume_];
      wait_until(t.request, deadline_);
      const Slice seg = t.segment;
      if (t.stage < p_ - 1)  // reduce-scatter: add the received partial sum into ours
        reduce_into(data_.type(), op_, data_.data() + seg.begin * element_bytes_,
                    slot(next_consume_), seg.count);
      if (t.stage + 1 < last_) send(t.stage + 1, seg);
    }
    for (auto& stage : sends_) wait_all_until(stage, deadline_);
  }

  struct Transfer {
    int stage;
    Slice segment;
    Request request;
  };

  int send_chunk(int stage) const {
    return mod(shift_ + (stage < p_ - 1 ? r_ - stage : r_ + 1 - (stage - (p_ - 1))));
  }
  int recv_chunk(int stage) const {
    return mod(shift_ + (stage < p_ - 1 ? r_ - stage - 1 : r_ - (stage - (p_ - 1))));
  }
  int mod(int x) const { return ((x % p_) + p_) % p_; }

  // The receive order: stage by stage, segment by segment.
  void plan() {
    stage_end_.assign(static_cast<size_t>(first_), 0);
    for (int stage = first_; stage < last_; ++stage) {
      const Slice chunk = chunk_of(data_.count(), p_, recv_chunk(stage));
      for (size_t off = 0; off < chunk.count; off += segment_elems_)
        receives_.push_back(
            {stage, {chunk.begin + off, std::min(segment_elems_, chunk.count - off)}, {}});
      stage_end_.push_back(receives_.size());
    }
  }

  std::byte* slot(size_t receive_index) {
    return scratch_ +
           (receive_index % static_cast<size_t>(window_)) * slot_elems_ * element_bytes_;
  }

  void send(int stage, Slice seg) {
    sends_[static_cast<size_t>(stage)].push_back(
        comm_.isend(ConstView(sub_view(data_, seg)), next_, tag_));
  }

  void post_sends_of_first_stage() {
    const Slice chunk = chunk_of(data_.count(), p_, send_chunk(first_));
    for (size_t off = 0; off < chunk.count; off += segment_elems_)
      send(first_, {chunk.begin + off, std::min(segment_elems_, chunk.count - off)});
  }

  // Posts receives up to `window` ahead of the one being consumed.
  void post_receives() {
    while (next_post_ < receives_.size() &&
           next_post_ < next_consume_ + static_cast<size_t>(window_)) {
      Transfer& t = receives_[next_post_];
      if (t.stage >= p_ - 1) {
        // All-gather stage p-1+u lands where reduce-scatter stage u sent from: those
        // sends must all be posted (stage u-1 fully consumed) and then complete.
        const int u = t.stage - (p_ - 1);
        if (first_ == 0 && u >= 1 && next_consume_ < stage_end_[static_cast<size_t>(u - 1)]) return;
        if (first_ == 0 && !sends_done_[static_cast<size_t>(u)]) {
          wait_all_until(sends_[static_cast<size_t>(u)], deadline_);
          sends_done_[static_cast<size_t>(u)] = true;
        }
        t.request = comm_.irecv(sub_view(data_, t.segment), prev_, tag_);
      } else {
        t.request = comm_.irecv(
            MutView(std::span<std::byte>(slot(next_post_), t.segment.count * element_bytes_),
                    data_.type(), t.segment.count),
            prev_, tag_);
      }
      ++next_post_;
    }
  }

  Communicator& comm_;
  MutView data_;
  ReduceOp op_;
  const int p_, r_, next_, prev_;
  const size_t element_bytes_;
  const size_t segment_elems_;
  const int window_;
  const int tag_;
  const Clock::time_point deadline_;
  const int stages_;
  const int first_, last_;  // the stages run: [first_, last_)
  const int shift_;         // chunk numbering: -1 when one half runs alone
  std::vector<Transfer> receives_;           // (all receives) in order
  std::vector<size_t> stage_end_;            // (stages) one past each stage's last receive
  std::vector<std::vector<Request>> sends_;  // (stages) sends of each stage
  std::vector<bool> sends_done_;             // (stages) all of a stage's sends completed
  size_t slot_elems_ = 0;
  std::vector<std::byte> own_scratch_;       // without a workspace
  std::byte* scratch_ = nullptr;             // (window, slot) reduce-scatter landing
  size_t next_post_ = 0;
  size_t next_consume_ = 0;
};

}  // namespace

void ring_payload(Communicator& comm, MutView data, ReduceOp op, const AlgorithmOptions& tuning,
                  Clock::time_point deadline) {
  if (comm.size() == 1 || data.count() == 0) return;
  Ring(comm, data, op, tuning, deadline).run();
}

void ring_reduce_scatter_payload(Communicator& comm, MutView data, ReduceOp op, const AlgorithmOptions& tuning,
                                 Clock::time_point deadline) {
  if (comm.size() == 1 || data.count() == 0) return;
  Ring(comm, data, op, tuning, deadline, Halves::reduce_scatter).run();
}

void ring_all_gather_payload(Communicator& comm, MutView data, const AlgorithmOptions& tuning,
                             Clock::time_point deadline) {
  if (comm.size() == 1 || data.count() == 0) return;
  Ring(comm, data, ReduceOp::sum, tuning, deadline, Halves::all_gather).run();
}

void run_signed(Communicator& comm, std::string_view algorithm, MutView data, ReduceOp op,
                const Options& options,
                const std::function<void(ReduceOp, Clock::time_point)>& payload) {
  if (!reduction_supported(data.type(), op))
    throw Error("comm/" + std::string(algorithm),
                fmt::format("rank {}: all_reduce: {} of {} is not supported", comm.rank(),
                            reduce_name(op), element_name(data.type())));
  const ReduceOp base = op == ReduceOp::avg ? ReduceOp::sum : op;
  comm.run_p2p_collective(CollectiveKind::all_reduce, algorithm, options, data.count(),
                          data.type(), op,
                          [&](Clock::time_point deadline) { payload(base, deadline); });
  if (op == ReduceOp::avg && comm.size() > 1)
    divide(data.type(), data.data(), data.count(), comm.size());
}

MutView own_chunk(const Communicator& comm, MutView data) {
  const Slice mine = chunk_of(data.count(), comm.size(), comm.rank());
  return sub_view(data, mine);
}

namespace {
void check_divisible(const Communicator& comm, std::string_view algorithm, std::string_view what, MutView data) {
  if (data.count() % static_cast<size_t>(comm.size()) != 0)
    throw Error("comm/" + std::string(algorithm),
                fmt::format("rank {}: {}: {} elements do not cut into {} equal chunks", comm.rank(), what,
                            data.count(), comm.size()));
}
}  // namespace

void run_signed_scatter(Communicator& comm, std::string_view algorithm, MutView data, ReduceOp op,
                        const Options& options, const std::function<void(ReduceOp, Clock::time_point)>& payload) {
  if (!reduction_supported(data.type(), op))
    throw Error("comm/" + std::string(algorithm),
                fmt::format("rank {}: reduce_scatter: {} of {} is not supported", comm.rank(), reduce_name(op),
                            element_name(data.type())));
  check_divisible(comm, algorithm, "reduce_scatter", data);
  const ReduceOp base = op == ReduceOp::avg ? ReduceOp::sum : op;
  comm.run_p2p_collective(CollectiveKind::reduce_scatter, algorithm, options, data.count() / comm.size(),
                          data.type(), op, [&](Clock::time_point deadline) { payload(base, deadline); });
  if (op == ReduceOp::avg && comm.size() > 1) {
    const MutView mine = own_chunk(comm, data);
    divide(mine.type(), mine.data(), mine.count(), comm.size());
  }
}

void run_signed_gather(Communicator& comm, std::string_view algorithm, MutView data, const Options& options,
                       const std::function<void(Clock::time_point)>& payload) {
  check_divisible(comm, algorithm, "all_gather", data);
  comm.run_p2p_collective(CollectiveKind::all_gather, algorithm, options, data.count() / comm.size(), data.type(),
                          ReduceOp::sum, payload);
}

}  // namespace detail

void ring_all_reduce(Communicator& comm, MutView data, ReduceOp op, const Options& options,
                     const AlgorithmOptions& tuning) {
  const AlgorithmOptions resolved = tuning.resolve(comm);
  detail::run_signed(comm, "ring", data, op, options,
                     [&](ReduceOp base, Clock::time_point deadline) {
                       detail::ring_payload(comm, data, base, resolved, deadline);
                     });
}

void ring_reduce_scatter(Communicator& comm, MutView data, ReduceOp op, const Options& options,
                         const AlgorithmOptions& tuning) {
  const AlgorithmOptions resolved = tuning.resolve(comm);
  detail::run_signed_scatter(comm, "ring", data, op, options, [&](ReduceOp base, Clock::time_point deadline) {
    detail::ring_reduce_scatter_payload(comm, data, base, resolved, deadline);
  });
}

void ring_all_gather(Communicator& comm, MutView data, const Options& options, const AlgorithmOptions& tuning) {
  const AlgorithmOptions resolved = tuning.resolve(comm);
  detail::run_signed_gather(comm, "ring", data, options, [&](Clock::time_point deadline) {
    detail::ring_all_gather_payload(comm, data, resolved, deadline);
  });
}

}  // namespace flotilla::comm
