// Non-blocking point-to-point operations as RAII values, and the deadline-bounded wait
// every comm wait goes through. A Request that goes out of scope while its operation is
// still pending finishes it: a receive is cancelled (nobody may write into memory its
// owner is about to free), a send is waited for (bounded by its timeout).
#pragma once

#include <chrono>
#include <algorithm>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>

namespace flotilla::comm {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Seconds for messages: "30 s", "0.25 s".
std::string format_seconds(milliseconds timeout);

// How a wait polls.
//   busy:    back to back, yielding the core between polls, until done or the deadline.
//            For operations in flight: MPI's nonblocking collectives (libnbc) and large
//            messages advance only inside MPI calls, so every pause between polls is a
//            pause in the transfer (measured on 2 shared cores, 2 and 4 ranks: sleeping
//            up to 1 ms between polls made an all_reduce of 1 MiB 40-90x slower than
//            MPI_Allreduce; polling busy, 1.2-1.6x). MPI's own blocking calls spin too.
//   patient: busy for the first millisecond, then sleeping 1 us doubling up to 1 ms
//            between polls. For waiting on peers to arrive (the mismatch check), which
//            can take seconds while a peer writes a checkpoint; it overshoots the arrival
//            by at most ~1 ms and leaves the core to compute threads meanwhile.
enum class Polling { busy, patient };

// Polls `done()` until it returns true (-> true) or `deadline` passes (-> false).
template <class Done>
bool poll_until(Clock::time_point deadline, Done&& done, Polling polling = Polling::busy) {
  const auto spin_until = polling == Polling::busy
                              ? deadline
                              : std::min(deadline, Clock::now() + std::chrono::milliseconds(1));
  do {
    if (done()) return true;
    std::this_thread::yield();
  } while (Clock::now() < spin_until);
  auto nap = std::chrono::microseconds(1);
  for (;;) {
    if (done()) return true;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(nap, deadline - now));
    nap = std::min(nap * 2, std::chrono::microseconds(1000));
  }
}

// What a pending operation is, for errors: "[comm/mpi] rank 0: irecv from rank 3 (tag 7,
// 1023 x f32) timed out after 2 s waiting for ranks [3]".
struct RequestInfo {
  std::string component;  // "comm/mpi"
  int rank = 0;           // this rank, in the communicator that started the operation
  int peer = 0;
  bool is_send = false;
  std::string what;  // "irecv from rank 3 (tag 7, 1023 x f32)"
  milliseconds timeout{0};  // the communicator's default when the operation started
};

// A backend's pending operation.
class PendingOp {
 public:
  explicit PendingOp(RequestInfo info) : info_(std::move(info)) {}
  virtual ~PendingOp() = default;
  PendingOp(const PendingOp&) = delete;
  PendingOp& operator=(const PendingOp&) = delete;

  // True once complete; throws flotilla::Error when the operation failed (for instance a
  // message of another size than the receive buffer).
  virtual bool test() = 0;
  // Withdraws a receive; test() then reports completion. Sends cannot be withdrawn (MPI-4
  // deprecates it) and ignore this.
  virtual void cancel() = 0;
  const RequestInfo& info() const { return info_; }

 private:
  RequestInfo info_;
};

class Request {
 public:
  Request() = default;
  explicit Request(std::unique_ptr<PendingOp> op) : op_(std::move(op)) {}
  ~Request() { finish(); }
  Request(Request&& o) noexcept = default;
  Request& operator=(Request&& o) noexcept {
    if (this != &o) {
      finish();
      op_ = std::move(o.op_);
    }
    return *this;
  }
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;

  // Still pending (not yet seen complete by test() or wait()).
  bool active() const { return op_ != nullptr; }
  // True once complete; never blocks.
  bool test();
  // Blocks until complete; throws TimeoutError after `timeout` (default: the
  // communicator's timeout when the request was made).
  void wait(std::optional<milliseconds> timeout = {});
  // A receive is withdrawn, a send waited for; afterwards the request is inactive.
  void cancel();
  // Gives up without waiting, for the unwinding after a timeout: a receive is withdrawn,
  // a send left to the backend (MPI frees it and may still read its buffer, which is why
  // a timeout leaves the communicator unusable and the job to be aborted). Without this, a
  // pending send's destructor waits up to the communicator's whole timeout again.
  void abandon() noexcept;

 private:
  friend void wait_all(std::span<Request>, std::optional<milliseconds>);
  void finish() noexcept;
  std::unique_ptr<PendingOp> op_;
};

// Waits for every request; on timeout the TimeoutError names every peer still pending.
void wait_all(std::span<Request> requests, std::optional<milliseconds> timeout = {});

}  // namespace flotilla::comm
