#include "flotilla/comm/thread/thread_group.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "flotilla/comm/local/local_communicator.hpp"

namespace flotilla::comm {
namespace detail {

struct Posting {
  Signature signature;
  const std::byte* in = nullptr;  // the rank's input: valid until the closing meeting
  int color = -1;                 // split
  int key = 0;                    // split
  std::shared_ptr<Rendezvous> child;  // split: the new group's, published by its leader
};

struct Message {
  int source;
  int tag;
  std::vector<std::byte> bytes;
};

struct PostedRecv {
  int source;
  int tag;
  std::byte* dest;
  size_t bytes;
  std::string what;  // for errors
  bool done = false;
  std::string error;
};

struct Rendezvous {
  explicit Rendezvous(int n)
      : size(n), arrived(n, 0), postings(n), unexpected(n), posted(n) {}

  const int size;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint64_t> arrived;  // (size) the last meeting each rank reached
  std::vector<Posting> postings;  // (size)
  std::string broken;             // set by a rank that timed out; everyone stops
  std::vector<std::deque<Message>> unexpected;                 // (size) by receiver
  std::vector<std::list<std::shared_ptr<PostedRecv>>> posted;  // (size) by receiver
};

}  // namespace detail

namespace {

using detail::Posting;
using detail::Rendezvous;

class ThreadRecvOp final : public PendingOp {
 public:
  ThreadRecvOp(std::shared_ptr<Rendezvous> rv, std::shared_ptr<detail::PostedRecv> posted,
               RequestInfo info)
      : PendingOp(std::move(info)), rv_(std::move(rv)), posted_(std::move(posted)) {}
  ~ThreadRecvOp() override { cancel(); }

  bool test() override {
    std::lock_guard lock(rv_->mu);
    if (!posted_->done) return false;
    if (!posted_->error.empty())
      throw Error(info().component, fmt::format("rank {}: {}", info().rank, posted_->error));
    return true;
  }
  void cancel() override {
    std::lock_guard lock(rv_->mu);
    if (posted_->done) return;
    rv_->posted[info().rank].remove(posted_);
    posted_->done = true;
  }

 private:
  std::shared_ptr<Rendezvous> rv_;
  std::shared_ptr<detail::PostedRecv> posted_;
};

// `what` describes the receive: "recv from rank 0 (tag 3, 4 x i32)".
std::string size_error(const std::string& what, size_t got, size_t want) {
  return fmt::format("{}: the message has {} bytes, the buffer {}", what, got, want);
}

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<Rendezvous> rv, int rank, const Settings& settings)
      : Communicator(Identity{"thread", rank, rv->size, rank, rv->size, local_host_name()},
                     settings),
        rv_(std::move(rv)) {}

 protected:
  Request do_isend(ConstView data, int dest, int tag) override {
    std::lock_guard lock(rv_->mu);
    auto& waiting = rv_->posted[dest];
    const auto match = std::find_if(waiting.begin(), waiting.end(), [&](const auto& p) {
      return p->source == rank() && p->tag == tag;
    });
    if (match != waiting.end()) {
      detail::PostedRecv& p = **match;
      if (p.bytes != data.size_bytes())
        p.error = size_error(p.what, data.size_bytes(), p.bytes);
      else if (p.bytes)
        std::memcpy(p.dest, data.data(), p.bytes);
      p.done = true;
      waiting.erase(match);
    } else {
      rv_->unexpected[dest].push_back(
          {rank(), tag, std::vector<std::byte>(data.data(), data.data() + data.size_bytes())});
    }
    return Request();  // complete: the bytes are copied
  }

  Request do_irecv(MutView data, int source, int tag) override {
    std::lock_guard lock(rv_->mu);
    auto& box = rv_->unexpected[rank()];
    const auto match = std::find_if(box.begin(), box.end(), [&](const detail::Message& m) {
      return m.source == source && m.tag == tag;
    });
    if (match != box.end()) {
      const detail::Message message = std::move(*match);
      box.erase(match);
      if (message.bytes.size() != data.size_bytes())
        fail(size_error(request_info(source, false, tag, data).what, message.bytes.size(),
                        data.size_bytes()));
      if (!message.bytes.empty())
        std::memcpy(data.data(), message.bytes.data(), message.bytes.size());
      return Request();
    }
    RequestInfo info = request_info(source, false, tag, data);
    auto posted = std::make_shared<detail::PostedRecv>(
        detail::PostedRecv{source, tag, data.data(), data.size_bytes(), info.what, false, {}});
    rv_->posted[rank()].push_back(posted);
    return Request(std::make_unique<ThreadRecvOp>(rv_, posted, std::move(info)));
  }

  void do_all_reduce(const Collective& c, ConstView in, MutView out, ReduceOp op) override {
    std::vector<std::byte> sum(in.size_bytes());  // (n) in bytes
    exchange(c, in.data(), [&](const std::vector<Posting>& postings) {
      if (sum.empty()) return;
      std::memcpy(sum.data(), postings[0].in, sum.size());
      for (int r = 1; r < size(); ++r)
        reduce_into(in.type(), op, sum.data(), postings[r].in, in.count());
    });
    // Only now: with in == out, the others read this buffer until the closing meeting.
    if (!sum.empty()) std::memcpy(out.data(), sum.data(), sum.size());
  }

  void do_broadcast(const Collective& c, MutView data, int root) override {
    exchange(c, data.data(), [&](const std::vector<Posting>& postings) {
      if (rank() != root && data.size_bytes())
        std::memcpy(data.data(), postings[root].in, data.size_bytes());
    });
  }

  void do_all_gather(const Collective& c, ConstView in, MutView out) override {
    const size_t chunk_bytes = in.size_bytes();
    exchange(c, in.data(), [&](const std::vector<Posting>& postings) {
      if (!chunk_bytes) return;
      for (int r = 0; r < size(); ++r)
        std::memcpy(out.data() + r * chunk_bytes, postings[r].in, chunk_bytes);
    });
  }

  void do_reduce_scatter(const Collective& c, ConstView in, MutView out, ReduceOp op) override {
    const size_t chunk_bytes = out.size_bytes();
    const size_t mine = static_cast<size_t>(rank()) * chunk_bytes;
    exchange(c, in.data(), [&](const std::vector<Posting>& postings) {
      if (!chunk_bytes) return;
      std::memcpy(out.data(), postings[0].in + mine, chunk_bytes);
      for (int r = 1; r < size(); ++r)
        reduce_into(out.type(), op, out.data(), postings[r].in + mine, out.count());
    });
  }

  void do_all_to_all(const Collective& c, ConstView in, MutView out) override {
    const size_t chunk_bytes = in.size_bytes() / size();
    const size_t mine = static_cast<size_t>(rank()) * chunk_bytes;
    exchange(c, in.data(), [&](const std::vector<Posting>& postings) {
      if (!chunk_bytes) return;
      for (int r = 0; r < size(); ++r)
        std::memcpy(out.data() + r * chunk_bytes, postings[r].in + mine, chunk_bytes);
    });
  }

  void do_barrier(const Collective& c) override {
    exchange(c, nullptr, [](const std::vector<Posting>&) {});
  }

  // Three meetings: colors posted; each new group's leader (its lowest new rank)
  // publishes the group's rendezvous; the members have picked it up.
  std::unique_ptr<Communicator> do_split(const Collective& c, int color, int key) override {
    {
      std::lock_guard lock(rv_->mu);
      rv_->postings[rank()] = Posting{c.signature, nullptr, color, key, nullptr};
    }
    meet(c);
    const std::string mismatch = signature_mismatch();
    struct Member {
      int key;
      int rank;
    };
    std::vector<Member> members;  // of this rank's new group, in new-rank order
    if (mismatch.empty() && color >= 0) {
      std::lock_guard lock(rv_->mu);
      for (int r = 0; r < size(); ++r)
        if (rv_->postings[r].color == color) members.push_back({rv_->postings[r].key, r});
      std::stable_sort(members.begin(), members.end(),
                       [](const Member& a, const Member& b) { return a.key < b.key; });
      if (members[0].rank == rank())
        rv_->postings[rank()].child = std::make_shared<Rendezvous>(members.size());
    }
    meet(c);
    std::shared_ptr<Rendezvous> child;
    if (!members.empty()) {
      std::lock_guard lock(rv_->mu);
      child = rv_->postings[members[0].rank].child;
    }
    meet(c);
    if (!mismatch.empty()) throw MismatchError("comm", mismatch);
    if (!child) return nullptr;
    const auto me = std::find_if(members.begin(), members.end(),
                                 [&](const Member& m) { return m.rank == rank(); });
    return std::make_unique<ThreadCommunicator>(std::move(child),
                                                static_cast<int>(me - members.begin()),
                                                settings());
  }

 private:
  // Meetings are numbered per group. A rank at meeting k waits until every rank has
  // reached k, so none is ever more than one meeting ahead: what a rank posted before
  // meeting k stays untouched until it passes meeting k + 1.
  void meet(const Collective& c) {
    std::unique_lock lock(rv_->mu);
    const uint64_t meeting = ++meeting_;
    rv_->arrived[rank()] = meeting;
    rv_->cv.notify_all();
    // Each rank waits for its own deadline: a peer that gave up earlier does not cut the
    // wait short, so every waiting rank reports the late ranks itself.
    const bool all_here = rv_->cv.wait_until(lock, c.deadline, [&] {
      return std::all_of(rv_->arrived.begin(), rv_->arrived.end(),
                         [&](uint64_t m) { return m >= meeting; });
    });
    if (all_here) {
      // A rank that timed out has left, and its buffers with it.
      if (!rv_->broken.empty())
        fail(fmt::format("{}: the group is unusable: {}", c.label(), rv_->broken));
      return;
    }
    std::vector<int> late;
    for (int r = 0; r < size(); ++r)
      if (rv_->arrived[r] < meeting) late.push_back(r);
    if (rv_->broken.empty()) rv_->broken = fmt::format("rank {} timed out in {}", rank(), c.label());
    rv_->cv.notify_all();
    fail_timeout(c, fmt::format("waiting for ranks [{}]", fmt::join(late, ", ")));
  }

  std::string signature_mismatch() {
    std::vector<Signature> signatures;
    std::lock_guard lock(rv_->mu);
    for (const Posting& p : rv_->postings) signatures.push_back(p.signature);
    return find_mismatch(signatures);
  }

  // Post `in`, meet, read the others' postings (unless the signatures differ), meet.
  // The postings do not change between the two meetings, so reading needs no lock.
  template <class Read>
  void exchange(const Collective& c, const std::byte* in, Read&& read) {
    {
      std::lock_guard lock(rv_->mu);
      rv_->postings[rank()] = Posting{c.signature, in, -1, 0, nullptr};
    }
    meet(c);
    const std::string mismatch = signature_mismatch();
    std::exception_ptr error;
    if (mismatch.empty()) {
      try {
        read(rv_->postings);
      } catch (...) {
        error = std::current_exception();
      }
    }
    meet(c);
    if (!mismatch.empty()) throw MismatchError("comm", mismatch);
    if (error) std::rethrow_exception(error);
  }

  std::shared_ptr<Rendezvous> rv_;
  uint64_t meeting_ = 0;
};

}  // namespace

ThreadGroup::ThreadGroup(int size, const Settings& settings)
    : rendezvous_(std::make_shared<Rendezvous>(size)), settings_(settings) {
  if (size < 1) throw Error("comm/thread", fmt::format("a group needs at least one rank, not {}", size));
}

int ThreadGroup::size() const { return rendezvous_->size; }

std::unique_ptr<Communicator> ThreadGroup::communicator(int rank) {
  if (rank < 0 || rank >= size())
    throw Error("comm/thread", fmt::format("rank {} is outside the group of {}", rank, size()));
  return std::make_unique<ThreadCommunicator>(rendezvous_, rank, settings_);
}

void run_threads(int size, const std::function<void(Communicator&)>& body,
                 const Settings& settings) {
  ThreadGroup group(size, settings);
  std::vector<std::unique_ptr<Communicator>> communicators;
  for (int r = 0; r < size; ++r) communicators.push_back(group.communicator(r));
  std::vector<std::exception_ptr> errors(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      try {
        body(*communicators[r]);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace flotilla::comm
