#include "flotilla/comm/algorithms/host_shm.hpp"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "flotilla/base/log.hpp"

namespace flotilla::comm {
namespace {

// Header: each counter on its own cache line, so that one rank's writes do not slow the
// others' polls. Counters: published[0..kMaxRanks), taken[0..kMaxRanks), consumed, ready,
// shared[0..kMaxRanks), read[0..kMaxRanks); then the doorbell (a 32-bit futex word) and the
// count of ranks sleeping on it.
constexpr size_t kLine = 64;
constexpr size_t kPublished = 0;
constexpr size_t kTaken = HostShm::kMaxRanks;
constexpr size_t kConsumed = 2 * HostShm::kMaxRanks;
constexpr size_t kReady = kConsumed + 1;
constexpr size_t kShared = kReady + 1;
constexpr size_t kRead = kShared + HostShm::kMaxRanks;
constexpr size_t kDoorbell = kRead + HostShm::kMaxRanks;
constexpr size_t kSleepers = kDoorbell + 1;
constexpr size_t kCounters = kSleepers + 1;
constexpr size_t kHeaderBytes = kCounters * kLine;

// How long a wait polls before it sleeps on the doorbell. A peer that is running answers
// within a segment's copy (tens of microseconds); one that is not (its core taken by compute
// threads) would be waited for by a poll that takes a core from them.
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(50);
// The longest single sleep: the deadline is looked at between sleeps.
constexpr auto kLongestSleep = std::chrono::milliseconds(50);

uint64_t load(uint64_t& c) { return std::atomic_ref<uint64_t>(c).load(std::memory_order_acquire); }

long futex(uint32_t* word, int op, uint32_t value, const timespec* timeout) {
  // Not FUTEX_PRIVATE: the word lies in memory that other processes map.
  return syscall(SYS_futex, word, op, value, timeout, nullptr, 0);
}

// Maps `name` (created when `create`), or returns null.
std::byte* map(const std::string& name, size_t bytes, bool create) {
  const int fd = shm_open(name.c_str(), create ? O_CREAT | O_EXCL | O_RDWR : O_RDWR, 0600);
  if (fd < 0) return nullptr;
  if (create && ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    close(fd);
    return nullptr;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  return p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
}

}  // namespace

size_t HostShm::arena_bytes(int ranks) {
  // Header, (ranks, 2) slots, 2 result slots, (ranks, 2) scatter slots.
  return kHeaderBytes + (static_cast<size_t>(ranks) * 2 + 2) * kSegmentBytes +
         static_cast<size_t>(ranks) * 2 * kScatterSlotBytes;
}

std::unique_ptr<HostShm> HostShm::create(Communicator& host) {
  const int size = host.size(), rank = host.rank();
  if (size < 2 || size > kMaxRanks) return nullptr;
  const size_t bytes = arena_bytes(size);
  // The leader names and creates the arena; everyone learns the name.
  std::array<uint8_t, 64> name_bytes{};
  std::string name;
  std::byte* base = nullptr;
  if (rank == 0) {
    std::random_device rd;
    name = fmt::format("/flotilla-{}-{:08x}{:08x}", getpid(), rd(), rd());
    base = map(name, bytes, true);
    if (!base) name.clear();  // tell the others there is nothing to map
    std::memcpy(name_bytes.data(), name.data(), name.size());
  }
  host.broadcast(name_bytes, 0, {.name = "host shm name"});
  if (rank != 0) {
    name.assign(reinterpret_cast<const char*>(name_bytes.data()),
                strnlen(reinterpret_cast<const char*>(name_bytes.data()), name_bytes.size()));
    if (!name.empty()) base = map(name, bytes, false);
  }
  // Everyone has mapped it (or failed) before the name goes away.
  std::array<int32_t, 1> failed = {base == nullptr ? 1 : 0};
  host.all_reduce(failed, ReduceOp::max, {.name = "host shm mapped"});
  if (rank == 0 && !name.empty()) shm_unlink(name.c_str());
  if (failed[0]) {
    if (base) munmap(base, bytes);
    log::debug("comm/hier: no shared-memory arena among the {} local ranks: using "
               "point-to-point inside the host",
               size);
    return nullptr;
  }
  return std::unique_ptr<HostShm>(new HostShm(rank, size, base, bytes));
}

HostShm::HostShm(int rank, int size, std::byte* base, size_t bytes)
    : rank_(rank), size_(size), base_(base), bytes_(bytes) {}

HostShm::~HostShm() { munmap(base_, bytes_); }

uint64_t& HostShm::counter(size_t index) {
  return *reinterpret_cast<uint64_t*>(base_ + index * kLine);
}

std::byte* HostShm::slot(int rank, uint64_t segment) {
  return base_ + kHeaderBytes +
         (static_cast<size_t>(rank) * 2 + segment % 2) * kSegmentBytes;
}

std::byte* HostShm::result(uint64_t segment) {
  return base_ + kHeaderBytes + (static_cast<size_t>(size_) * 2 + segment % 2) * kSegmentBytes;
}

std::byte* HostShm::scatter_slot(int rank, uint64_t segment) {
  return base_ + kHeaderBytes +
         (static_cast<size_t>(size_) * 2 + 2) * kSegmentBytes +
         (static_cast<size_t>(rank) * 2 + segment % 2) * kScatterSlotBytes;
}

uint32_t& HostShm::doorbell() { return *reinterpret_cast<uint32_t*>(base_ + kDoorbell * kLine); }
uint32_t& HostShm::sleepers() { return *reinterpret_cast<uint32_t*>(base_ + kSleepers * kLine); }

// The counter's store, then the doorbell rung when someone sleeps on it. Both sides go
// through sequentially consistent operations (the sleeper: sleepers += 1, then its check
// of the counter; here: the store, then the load of sleepers), so either the sleeper sees
// the new value or this store sees the sleeper; in the second case the ring changes the
// doorbell's value, which a sleeper that has not yet slept finds changed (futex returns at
// once), and the wake reaches one that has.
void HostShm::publish(size_t index, uint64_t value) {
  std::atomic_ref<uint64_t>(counter(index)).store(value, std::memory_order_seq_cst);
  if (std::atomic_ref<uint32_t>(sleepers()).load(std::memory_order_seq_cst) == 0) return;
  std::atomic_ref<uint32_t>(doorbell()).fetch_add(1, std::memory_order_seq_cst);
  futex(&doorbell(), FUTEX_WAKE, std::numeric_limits<int32_t>::max(), nullptr);
}

// Polls `done` for kSpinBeforeSleep, then sleeps on the doorbell between checks (a futex
// wait, which gives the core to the compute threads: on a host with fewer cores than ranks
// times threads, a polling wait took a core from them), each sleep bounded by the deadline.
template <class Done>
void HostShm::wait(Clock::time_point deadline, const char* what, Done&& done) {
  if (poll_until(std::min(deadline, Clock::now() + kSpinBeforeSleep), done)) return;
  std::atomic_ref<uint32_t> bell(doorbell()), asleep(sleepers());
  for (;;) {
    const uint32_t ring = bell.load(std::memory_order_seq_cst);
    asleep.fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);  // done()'s acquire loads stay after it
    const bool finished = done();
    const auto now = Clock::now();
    if (!finished && now < deadline) {
      const auto nap = std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::min<Clock::duration>(deadline - now, kLongestSleep));
      const timespec timeout{static_cast<time_t>(nap.count() / 1000000000), static_cast<long>(nap.count() % 1000000000)};
      futex(&doorbell(), FUTEX_WAIT, ring, &timeout);  // woken, timed out, or the bell rang already
    }
    asleep.fetch_sub(1, std::memory_order_seq_cst);
    if (finished) return;
    if (done()) return;
    if (Clock::now() >= deadline) break;
  }
  throw TimeoutError("comm/hier",
                     fmt::format("local rank {}: host shared memory: {} timed out", rank_, what));
}

void HostShm::reduce_to_leader(MutView data, ReduceOp op, Clock::time_point deadline) {
  const size_t element_bytes = element_size(data.type());
  const size_t seg_elems = kSegmentBytes / element_bytes;
  const size_t segments = (data.count() + seg_elems - 1) / seg_elems;
  for (size_t k = 0; k < segments; ++k) {
    const uint64_t s = reduced_ + k + 1;  // this segment's number, from 1
    const size_t count = std::min(seg_elems, data.count() - k * seg_elems);
    std::byte* mine = data.data() + k * seg_elems * element_bytes;
    if (rank_ != 0) {
      // Slot s % 2 last held segment s - 2: free once the leader has reduced it.
      wait(deadline, "waiting for the leader to reduce", [&] {
        return load(counter(kConsumed)) + 2 >= s;
      });
      std::memcpy(slot(rank_, s), mine, count * element_bytes);
      publish(kPublished + static_cast<size_t>(rank_), s);
    } else {
      // In local-rank order, so that the sum does not depend on who published first.
      for (int r = 1; r < size_; ++r) {
        wait(deadline, "waiting for a local rank to publish", [&] {
          return load(counter(kPublished + static_cast<size_t>(r))) >= s;
        });
        reduce_into(data.type(), op, mine, slot(r, s), count);
      }
      publish(kConsumed, s);
    }
  }
  reduced_ += segments;
}

void HostShm::broadcast_from_leader(MutView data, Clock::time_point deadline) {
  const size_t element_bytes = element_size(data.type());
  const size_t seg_elems = kSegmentBytes / element_bytes;
  const size_t segments = (data.count() + seg_elems - 1) / seg_elems;
  for (size_t k = 0; k < segments; ++k) {
    const uint64_t s = broadcast_ + k + 1;
    const size_t count = std::min(seg_elems, data.count() - k * seg_elems);
    std::byte* mine = data.data() + k * seg_elems * element_bytes;
    if (rank_ == 0) {
      // Result slot s % 2 last held segment s - 2: free once everyone copied it out.
      for (int r = 1; r < size_; ++r)
        wait(deadline, "waiting for a local rank to take the result", [&] {
          return load(counter(kTaken + static_cast<size_t>(r))) + 2 >= s;
        });
      std::memcpy(result(s), mine, count * element_bytes);
      publish(kReady, s);
    } else {
      wait(deadline, "waiting for the leader's result", [&] {
        return load(counter(kReady)) >= s;
      });
      std::memcpy(mine, result(s), count * element_bytes);
      publish(kTaken + static_cast<size_t>(rank_), s);
    }
  }
  broadcast_ += segments;
}

void HostShm::exchange_segment(MutView data, std::optional<ReduceOp> reduce, size_t piece_elems, size_t offset,
                               size_t count, Clock::time_point deadline) {
  const size_t element_bytes = element_size(data.type());
  const size_t n = data.count() / static_cast<size_t>(size_);
  const uint64_t s = ++scattered_;
  auto chunk = [&](int r) { return data.data() + (static_cast<size_t>(r) * n + offset) * element_bytes; };
  auto piece = [&](int owner, int r) { return scatter_slot(owner, s) + static_cast<size_t>(r) * piece_elems * element_bytes; };
  // Our slot s % 2 last held segment s - 2: free once every rank has read that one.
  for (int r = 0; r < size_; ++r)
    wait(deadline, "waiting for a local rank to read the scatter slots",
         [&] { return load(counter(kRead + static_cast<size_t>(r))) + 2 >= s; });
  if (reduce) {
    for (int r = 0; r < size_; ++r) std::memcpy(piece(rank_, r), chunk(r), count * element_bytes);
  } else {
    std::memcpy(piece(rank_, 0), chunk(rank_), count * element_bytes);
  }
  publish(kShared + static_cast<size_t>(rank_), s);
  for (int r = 0; r < size_; ++r) {
    wait(deadline, "waiting for a local rank to share", [&] {
      return load(counter(kShared + static_cast<size_t>(r))) >= s;
    });
    if (reduce) {
      if (r == 0) std::memcpy(chunk(rank_), piece(r, rank_), count * element_bytes);
      else reduce_into(data.type(), *reduce, chunk(rank_), piece(r, rank_), count);
    } else if (r != rank_) {
      std::memcpy(chunk(r), piece(r, 0), count * element_bytes);
    }
  }
  publish(kRead + static_cast<size_t>(rank_), s);
}

void HostShm::reduce_scatter(MutView data, ReduceOp op, Clock::time_point deadline) {
  const size_t piece_elems = kScatterSlotBytes / element_size(data.type()) / static_cast<size_t>(size_);
  const size_t n = data.count() / static_cast<size_t>(size_);
  for (size_t offset = 0; offset < n; offset += piece_elems)
    exchange_segment(data, op, piece_elems, offset, std::min(piece_elems, n - offset), deadline);
}

void HostShm::all_gather(MutView data, Clock::time_point deadline) {
  // One piece a segment: ours, the whole slot.
  const size_t piece_elems = kScatterSlotBytes / element_size(data.type());
  const size_t n = data.count() / static_cast<size_t>(size_);
  for (size_t offset = 0; offset < n; offset += piece_elems)
    exchange_segment(data, std::nullopt, piece_elems, offset, std::min(piece_elems, n - offset), deadline);
}

}  // namespace flotilla::comm
