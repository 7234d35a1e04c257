// N ranks as N threads of one process (STYLE: no process-wide globals, so a test can run
// four ranks as threads). The ranks share a rendezvous: a collective is two meetings -
// at the first every rank has posted its signature and input buffer, between the two
// each rank reads what it needs from the others' buffers, at the second everyone has
// finished reading. Reductions add in rank order, so every rank gets bit-identical
// results. Point-to-point messages are copied into the receiver's mailbox at send time
// (a send completes at once, like MPI's eager protocol).
//
// The mismatch check is always on here, whatever Settings says: it costs nothing, and
// reading a peer's buffer of another shape would run off its end.
#pragma once

#include <functional>
#include <memory>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

namespace detail {
struct Rendezvous;
}

class ThreadGroup {
 public:
  explicit ThreadGroup(int size, const Settings& settings = {});
  int size() const;
  // The communicator of `rank` (once per rank); each is used by one thread at a time.
  std::unique_ptr<Communicator> communicator(int rank);

 private:
  std::shared_ptr<detail::Rendezvous> rendezvous_;
  Settings settings_;
};

// Runs body(communicator) on `size` threads, one rank each, and joins them; then
// rethrows the exception of the lowest rank that threw, if any.
void run_threads(int size, const std::function<void(Communicator&)>& body,
                 const Settings& settings = {});

}  // namespace flotilla::comm
