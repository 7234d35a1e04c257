#include "flotilla/comm/communicator.hpp"

#include <fmt/format.h>

namespace flotilla::comm {
namespace {

bool overlap(ConstView a, ConstView b) {
  if (a.size_bytes() == 0 || b.size_bytes() == 0) return false;
  return a.data() < b.data() + b.size_bytes() && b.data() < a.data() + a.size_bytes();
}

}  // namespace

Communicator::Communicator(Identity identity, const Settings& settings)
    : backend_(std::move(identity.backend)),
      component_("comm/" + backend_),
      rank_(identity.rank),
      size_(identity.size),
      local_rank_(identity.local_rank),
      local_size_(identity.local_size),
      host_name_(std::move(identity.host_name)),
      settings_(settings) {}

std::string Communicator::Collective::label() const {
  std::string label = fmt::format("{} #{}", collective_name(signature.kind), signature.seq);
  if (signature.name_bytes) label += fmt::format(" ({})", signature.name_view());
  return label;
}

void Communicator::fail(std::string_view what) const {
  throw Error(component_, fmt::format("rank {}: {}", rank_, what));
}

void Communicator::fail_timeout(const Collective& c, std::string_view why) const {
  throw TimeoutError(component_, fmt::format("rank {}: {} timed out after {} {}", rank_,
                                             c.label(), format_seconds(c.timeout), why));
}

RequestInfo Communicator::request_info(int peer, bool is_send, int tag, ConstView data) const {
  RequestInfo info;
  info.component = component_;
  info.rank = rank_;
  info.peer = peer;
  info.is_send = is_send;
  info.what = fmt::format("{} {} rank {} (tag {}, {} x {})", is_send ? "send" : "recv",
                          is_send ? "to" : "from", peer, tag, data.count(),
                          element_name(data.type()));
  info.timeout = settings_.timeout;
  return info;
}

// --- point to point

void Communicator::check_peer(int peer, int tag, std::string_view what) const {
  if (peer < 0 || peer >= size_)
    fail(fmt::format("{}: rank {} is outside the group of {}", what, peer, size_));
  if (tag < 0 || tag > kMaxTag)
    fail(fmt::format("{}: tag {} is outside [0, {}]", what, tag, kMaxTag));
}

Request Communicator::isend(ConstView data, int dest, int tag) {
  check_peer(dest, tag, "send");
  return do_isend(data, dest, tag);
}

Request Communicator::irecv(MutView data, int source, int tag) {
  check_peer(source, tag, "recv");
  return do_irecv(data, source, tag);
}

void Communicator::send(ConstView data, int dest, int tag, const Options& options) {
  isend(data, dest, tag).wait(options.timeout);
}

void Communicator::recv(MutView data, int source, int tag, const Options& options) {
  irecv(data, source, tag).wait(options.timeout);
}

// --- collectives

Communicator::Collective Communicator::begin(CollectiveKind kind, const Options& options,
                                             uint64_t count, ElementType type, int root,
                                             ReduceOp reduce) {
  if (!broken_.empty())
    fail(fmt::format("{}: this communicator is unusable since {}", collective_name(kind),
                     broken_));
  Collective c;
  c.signature = Signature::make(++seq_, kind, options.name, count, type, root, reduce);
  c.timeout = options.timeout.value_or(settings_.timeout);
  c.deadline = Clock::now() + c.timeout;
  c.check_mismatch = settings_.check_mismatch;
  return c;
}

// A timeout may leave peers (or MPI) still writing into this collective's buffers, so
// the communicator refuses further work; a mismatch leaves every rank in step.
template <class Run>
void Communicator::run(const Collective& c, Run&& body) {
  try {
    body();
  } catch (const TimeoutError& e) {
    broken_ = fmt::format("{} timed out", c.label());
    throw;
  }
}

void Communicator::check_reduction(CollectiveKind kind, ElementType type, ReduceOp op) const {
  if (!reduction_supported(type, op))
    fail(fmt::format("{}: {} of {} is not supported{}", collective_name(kind),
                     reduce_name(op), element_name(type),
                     type == ElementType::f16 || type == ElementType::bf16
                         ? " (reduce in f32)"
                         : " (avg is for f32 and f64; sum integers instead)"));
}

void Communicator::all_reduce(MutView data, ReduceOp op, const Options& options) {
  all_reduce(ConstView(data), data, op, options);
}

void Communicator::all_reduce(ConstView in, MutView out, ReduceOp op, const Options& options) {
  check_reduction(CollectiveKind::all_reduce, in.type(), op);
  if (in.type() != out.type() || in.count() != out.count())
    fail(fmt::format("all_reduce: in is {} x {}, out {} x {}", in.count(),
                     element_name(in.type()), out.count(), element_name(out.type())));
  if (in.data() != out.data() && overlap(in, out))
    fail("all_reduce: in and out overlap without being the same buffer");
  const Collective c = begin(CollectiveKind::all_reduce, options, in.count(), in.type(), -1, op);
  const ReduceOp backend_op = op == ReduceOp::avg ? ReduceOp::sum : op;
  run(c, [&] { do_all_reduce(c, in, out, backend_op); });
  if (op == ReduceOp::avg && size_ > 1) divide(out.type(), out.data(), out.count(), size_);
}

void Communicator::broadcast(MutView data, int root, const Options& options) {
  if (root < 0 || root >= size_)
    fail(fmt::format("broadcast: root {} is outside the group of {}", root, size_));
  const Collective c =
      begin(CollectiveKind::broadcast, options, data.count(), data.type(), root, ReduceOp::sum);
  run(c, [&] { do_broadcast(c, data, root); });
}

void Communicator::all_gather(ConstView in, MutView out, const Options& options) {
  if (in.type() != out.type() || out.count() != in.count() * size_)
    fail(fmt::format("all_gather: in is {} x {}, so out must be {} x {}, not {} x {}",
                     in.count(), element_name(in.type()), in.count() * size_,
                     element_name(in.type()), out.count(), element_name(out.type())));
  if (overlap(in, out)) fail("all_gather: in and out overlap");
  const Collective c =
      begin(CollectiveKind::all_gather, options, in.count(), in.type(), -1, ReduceOp::sum);
  run(c, [&] { do_all_gather(c, in, out); });
}

void Communicator::reduce_scatter(ConstView in, MutView out, ReduceOp op,
                                  const Options& options) {
  check_reduction(CollectiveKind::reduce_scatter, in.type(), op);
  if (in.type() != out.type() || in.count() != out.count() * size_)
    fail(fmt::format("reduce_scatter: out is {} x {}, so in must be {} x {}, not {} x {}",
                     out.count(), element_name(out.type()), out.count() * size_,
                     element_name(out.type()), in.count(), element_name(in.type())));
  if (overlap(in, out)) fail("reduce_scatter: in and out overlap");
  const Collective c =
      begin(CollectiveKind::reduce_scatter, options, out.count(), out.type(), -1, op);
  const ReduceOp backend_op = op == ReduceOp::avg ? ReduceOp::sum : op;
  run(c, [&] { do_reduce_scatter(c, in, out, backend_op); });
  if (op == ReduceOp::avg && size_ > 1) divide(out.type(), out.data(), out.count(), size_);
}

void Communicator::all_to_all(ConstView in, MutView out, const Options& options) {
  if (in.type() != out.type() || in.count() != out.count() || in.count() % size_ != 0)
    fail(fmt::format("all_to_all: in is {} x {} and out {} x {}; both must be the same "
                     "multiple of the group size {}",
                     in.count(), element_name(in.type()), out.count(),
                     element_name(out.type()), size_));
  if (overlap(in, out)) fail("all_to_all: in and out overlap");
  const Collective c = begin(CollectiveKind::all_to_all, options, in.count() / size_,
                             in.type(), -1, ReduceOp::sum);
  run(c, [&] { do_all_to_all(c, in, out); });
}

void Communicator::barrier(const Options& options) {
  const Collective c = begin(CollectiveKind::barrier, options, 0, ElementType::u8, -1,
                             ReduceOp::sum);
  run(c, [&] { do_barrier(c); });
}

void Communicator::run_p2p_collective(CollectiveKind kind, std::string_view algorithm,
                                      const Options& options, uint64_t count,
                                      ElementType type, ReduceOp op,
                                      const std::function<void(Clock::time_point)>& body) {
  const std::string name = options.name.empty()
                               ? std::string(algorithm)
                               : fmt::format("{}:{}", algorithm, options.name);
  Options named = options;
  named.name = name;
  const Collective c = begin(kind, named, count, type, -1, op);
  // The backend's barrier is its mismatch check alone (it compares this signature); with
  // the check off, nothing synchronises before the payload.
  if (c.check_mismatch && size_ > 1) run(c, [&] { do_barrier(c); });
  run(c, [&] { body(c.deadline); });
}

std::unique_ptr<Communicator> Communicator::split(int color, int key, const Options& options) {
  const Collective c =
      begin(CollectiveKind::split, options, 0, ElementType::u8, -1, ReduceOp::sum);
  std::unique_ptr<Communicator> group;
  run(c, [&] { group = do_split(c, color < 0 ? -1 : color, key); });
  return group;
}

}  // namespace flotilla::comm
