#include "flotilla/comm/fusion.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

#include "flotilla/base/error.hpp"
#include "flotilla/base/timer.hpp"

namespace flotilla::comm {

std::vector<GradRange> plan_buckets(std::span<const GradRange> tensors, int64_t bucket_bytes) {
  const int64_t limit = std::max<int64_t>(1, bucket_bytes / static_cast<int64_t>(sizeof(float)));
  std::vector<GradRange> buckets;
  for (const GradRange& t : tensors) {
    if (t.size() <= 0) continue;
    if (!buckets.empty()) {
      GradRange& b = buckets.back();
      // Backward runs from the last layer down, so the next tensor usually sits just below
      // the bucket in memory; just above is contiguous too.
      const bool below = t.end == b.begin, above = t.begin == b.end;
      if ((below || above) && b.size() + t.size() <= limit) {
        if (below) b.begin = t.begin;
        else b.end = t.end;
        continue;
      }
    }
    buckets.push_back(t);
  }
  return buckets;
}

OverlappedAllReduce::OverlappedAllReduce(std::vector<GradRange> buckets, Reduce reduce, TraceRecorder* trace)
    : buckets_(std::move(buckets)),
      reduce_(std::move(reduce)),
      trace_(trace),
      missing_(buckets_.size(), 0),
      queued_(buckets_.size(), true),
      done_(buckets_.size()),
      thread_([this] { serve(); }) {}

OverlappedAllReduce::~OverlappedAllReduce() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  work_.notify_all();
  thread_.join();
}

void OverlappedAllReduce::begin(std::span<float> gradient) {
  std::lock_guard lock(mutex_);
  if (done_ != buckets_.size()) throw Error("comm/fusion", "a step began before the last one finished");
  gradient_ = gradient;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (buckets_[b].end > static_cast<int64_t>(gradient.size()))
      throw Error("comm/fusion", fmt::format("bucket [{}, {}) outside a gradient of {} elements", buckets_[b].begin,
                                             buckets_[b].end, gradient.size()));
    missing_[b] = buckets_[b].size();
    queued_[b] = false;
  }
  done_ = 0;
  queued_count_ = 0;
  error_ = nullptr;
}

void OverlappedAllReduce::ready(GradRange range) {
  std::lock_guard lock(mutex_);
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const int64_t overlap = std::min(range.end, buckets_[b].end) - std::max(range.begin, buckets_[b].begin);
    if (overlap <= 0 || queued_[b]) continue;
    missing_[b] -= overlap;
    if (missing_[b] <= 0) queue_locked(b);
  }
}

void OverlappedAllReduce::queue_locked(size_t bucket) {
  queued_[bucket] = true;
  ++queued_count_;
  queue_.push_back(bucket);
  work_.notify_one();
}

void OverlappedAllReduce::finish() {
  Timer blocked;
  std::unique_lock lock(mutex_);
  for (size_t b = 0; b < buckets_.size(); ++b)
    if (!queued_[b]) queue_locked(b);
  finished_.wait(lock, [&] { return done_ == buckets_.size(); });
  exposed_s_ += blocked.elapsed_s();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void OverlappedAllReduce::wait_in_flight(size_t buckets) {
  Timer blocked;
  std::unique_lock lock(mutex_);
  finished_.wait(lock, [&] { return queued_count_ - done_ <= buckets || error_ != nullptr; });
  exposed_s_ += blocked.elapsed_s();
}

void OverlappedAllReduce::serve() {
  std::unique_lock lock(mutex_);
  for (;;) {
    work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_ && queue_.empty()) return;
    const size_t b = queue_.front();
    queue_.pop_front();
    const std::span<float> part = gradient_.subspan(static_cast<size_t>(buckets_[b].begin),
                                                    static_cast<size_t>(buckets_[b].size()));
    const bool failed = error_ != nullptr;
    lock.unlock();
    if (!failed) {  // after an error the rest is skipped: the step is lost anyway
      try {
        TraceSpan span(trace_, fmt::format("all-reduce bucket {}", b), TraceLane::communication,
                       fmt::format(R"({{"bytes":{}}})", part.size_bytes()));
        reduce_(part);
      } catch (...) {
        lock.lock();
        error_ = std::current_exception();
        lock.unlock();
      }
    }
    lock.lock();
    ++done_;
    finished_.notify_all();  // finish() waits for all, wait_in_flight() for fewer in flight
  }
}

}  // namespace flotilla::comm
