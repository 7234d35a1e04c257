// Fusion buckets and overlap: gradients are reduced in buckets of about a fixed size, each
// on a communication thread as soon as backward has finished every gradient in it, while
// backward goes on with the layers below (PyTorch DDP's design, Li et al. VLDB 2020).
//
// Vocabulary:
//   - the *gradient* is one flat float buffer;
//   - a *tensor* is a range of it that backward finishes at once (a layer's weights);
//   - a *bucket* is a run of tensors, adjacent in the order backward finishes them and in
//     memory, of about `bucket_bytes`: one all-reduce.
// The optimizer waits (finish) only for what is still in flight when backward ends.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "flotilla/base/trace.hpp"

namespace flotilla::comm {

struct GradRange {
  int64_t begin = 0, end = 0;  // [begin, end) in floats
  int64_t size() const { return end - begin; }
};

// Buckets over `tensors`, listed in the order backward finishes them: consecutive tensors
// join one bucket while they are contiguous in memory and the bucket stays under
// `bucket_bytes` (a tensor larger than that is a bucket of its own).
std::vector<GradRange> plan_buckets(std::span<const GradRange> tensors_in_ready_order, int64_t bucket_bytes);

class OverlappedAllReduce {
 public:
  // Sums a span over the ranks; called on the communication thread, one bucket at a time,
  // in the order buckets complete — the same on every rank, as backward's order is.
  using Reduce = std::function<void(std::span<float>)>;

  OverlappedAllReduce(std::vector<GradRange> buckets, Reduce reduce, TraceRecorder* trace = nullptr);
  ~OverlappedAllReduce();
  OverlappedAllReduce(const OverlappedAllReduce&) = delete;
  OverlappedAllReduce& operator=(const OverlappedAllReduce&) = delete;

  // A new step over `gradient` (the buffer every bucket indexes).
  void begin(std::span<float> gradient);
  // Backward has finished `range`: every bucket now complete starts reducing.
  void ready(GradRange range);
  // Starts what was never marked ready (in bucket order), waits for every bucket and
  // rethrows the communication thread's error, if any.
  void finish();
  // Blocks until at most `buckets` of the ready ones are not yet reduced (the one being
  // reduced counts), or the communication thread failed (finish() says so): bounds how much
  // finished gradient waits for the network when backward outruns it (ZeRO-2 releases each
  // bucket once reduced). The time blocked counts in exposed_s().
  void wait_in_flight(size_t buckets);

  const std::vector<GradRange>& buckets() const { return buckets_; }
  // Seconds the caller spent blocked in finish() over all steps: communication not hidden.
  double exposed_s() const { return exposed_s_; }

 private:
  void queue_locked(size_t bucket);
  void serve();

  std::vector<GradRange> buckets_;
  Reduce reduce_;
  TraceRecorder* trace_;
  std::span<float> gradient_;
  std::vector<int64_t> missing_;  // per bucket: elements not yet ready
  std::vector<bool> queued_;
  std::deque<size_t> queue_;
  size_t done_ = 0;
  size_t queued_count_ = 0;  // buckets queued this step
  std::exception_ptr error_;
  bool stop_ = false;
  double exposed_s_ = 0.0;
  std::mutex mutex_;
  std::condition_variable work_, finished_;
  std::thread thread_;  // last: starts after everything it uses exists
};

}  // namespace flotilla::comm
