#include "flotilla/comm/request.hpp"

#include <algorithm>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "flotilla/base/log.hpp"
#include "flotilla/comm/errors.hpp"

namespace flotilla::comm {

std::string format_seconds(milliseconds timeout) {
  return fmt::format("{:g} s", std::chrono::duration<double>(timeout).count());
}

bool Request::test() {
  if (!op_) return true;
  bool done = false;
  try {
    done = op_->test();
  } catch (...) {
    op_.reset();
    throw;
  }
  if (done) op_.reset();
  return done;
}

void Request::wait(std::optional<milliseconds> timeout) {
  wait_all(std::span<Request>(this, 1), timeout);
}

void Request::cancel() {
  if (!op_) return;
  if (!op_->info().is_send) op_->cancel();
  wait();
}

void Request::abandon() noexcept {
  if (!op_) return;
  try {
    if (!op_->info().is_send) op_->cancel();
    (void)op_->test();
  } catch (const std::exception&) {
    // Failing to finish is what abandoning accepts.
  }
  op_.reset();
}

void Request::finish() noexcept {
  if (!op_) return;
  try {
    cancel();
  } catch (const std::exception& e) {
    // A destructor must not throw. A receive MPI could not withdraw is freed anyway by
    // the backend's destructor; the log says what may have been lost.
    log::warn("{}: abandoning {}: {}", op_ ? op_->info().component : "comm",
              op_ ? op_->info().what : "request", e.what());
  }
  op_.reset();
}

void wait_all(std::span<Request> requests, std::optional<milliseconds> timeout) {
  milliseconds limit{0};
  for (const Request& r : requests)
    if (r.op_) limit = std::max(limit, timeout.value_or(r.op_->info().timeout));
  const auto deadline = Clock::now() + limit;
  const bool done = poll_until(deadline, [&] {
    bool all = true;
    for (Request& r : requests) all = r.test() && all;
    return all;
  });
  if (done) return;

  std::vector<int> peers;
  std::vector<std::string> whats;
  const RequestInfo* first = nullptr;
  for (const Request& r : requests) {
    if (!r.op_) continue;
    if (!first) first = &r.op_->info();
    peers.push_back(r.op_->info().peer);
    whats.push_back(r.op_->info().what);
  }
  std::sort(peers.begin(), peers.end());
  peers.erase(std::unique(peers.begin(), peers.end()), peers.end());
  throw TimeoutError(first->component,
                     fmt::format("rank {}: {} timed out after {} waiting for ranks [{}]",
                                 first->rank, fmt::join(whats, "; "), format_seconds(limit),
                                 fmt::join(peers, ", ")));
}

}  // namespace flotilla::comm
