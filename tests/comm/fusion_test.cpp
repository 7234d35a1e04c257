// Fusion buckets reduced on a communication thread while the caller goes on: the plan,
// the sums, the overlap itself, and errors.
#include "flotilla/comm/fusion.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "../bounded_settings.hpp"

namespace flotilla::comm {
namespace {

TEST(Fusion, BucketsJoinContiguousTensorsInReadyOrderUpToTheSize) {
  // Backward order: the last tensor in memory first. 4-byte floats, 40-byte buckets.
  const std::vector<GradRange> tensors = {{90, 100}, {80, 90}, {60, 80}, {50, 60}, {0, 50}};
  const std::vector<GradRange> b = plan_buckets(tensors, 40 * 4);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0].begin, 60);  // 90..100 + 80..90 + 60..80 = 40 floats
  EXPECT_EQ(b[0].end, 100);
  EXPECT_EQ(b[1].begin, 50);  // 50..60, then 0..50 would pass 40
  EXPECT_EQ(b[1].end, 60);
  EXPECT_EQ(b[2].begin, 0);   // larger than a bucket: alone
  EXPECT_EQ(b[2].end, 50);
  // A gap in memory starts a new bucket even under the size.
  const std::vector<GradRange> gap = {{20, 30}, {0, 10}};
  EXPECT_EQ(plan_buckets(gap, 1 << 20).size(), 2u);
}

TEST(Fusion, BucketsAreSummedOverRanksAndStartBeforeFinish) {
  const int world = 3;
  const int64_t n = 1000;
  std::vector<GradRange> tensors;
  for (int64_t end = n; end > 0; end -= 90) tensors.push_back({std::max<int64_t>(0, end - 90), end});
  run_threads(world, [&](Communicator& comm) {
    std::atomic<int> reduced{0};
    OverlappedAllReduce overlap(plan_buckets(tensors, 200 * 4), [&](std::span<float> part) {
      comm.all_reduce(part, ReduceOp::sum, Options{.name = "bucket"});
      ++reduced;
    });
    ASSERT_GE(overlap.buckets().size(), 4u);
    std::vector<float> g(n);
    for (int step = 0; step < 2; ++step) {
      for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>((comm.rank() + 1) * (i + step));
      reduced = 0;
      overlap.begin(g);
      for (const GradRange& t : tensors) {
        overlap.ready(t);
        if (t.begin == overlap.buckets()[0].begin) {
          // The first bucket is complete: it is reduced while "backward" is still here.
          const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
          while (reduced.load() == 0 && std::chrono::steady_clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
          EXPECT_GE(reduced.load(), 1) << "the first bucket did not start before finish()";
        }
      }
      overlap.finish();
      EXPECT_EQ(reduced.load(), static_cast<int>(overlap.buckets().size()));
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(g[i], static_cast<float>(6 * (i + step))) << i;  // (1+2+3) x
    }
  }, testing::bounded_settings());
}

TEST(Fusion, RangesNeverMarkedAreReducedAtFinish) {
  run_threads(2, [&](Communicator& comm) {
    OverlappedAllReduce overlap(plan_buckets(std::vector<GradRange>{{50, 100}, {0, 50}}, 50 * 4),
                                [&](std::span<float> part) { comm.all_reduce(part, ReduceOp::sum); });
    std::vector<float> g(100, 1.0f);
    overlap.begin(g);
    overlap.ready({50, 100});
    overlap.finish();  // [0, 50) was never marked: reduced now
    for (float x : g) ASSERT_EQ(x, 2.0f);
  }, testing::bounded_settings());
}

TEST(Fusion, ACommunicationErrorReachesFinish) {
  OverlappedAllReduce overlap(plan_buckets(std::vector<GradRange>{{10, 20}, {0, 10}}, 10 * 4),
                              [](std::span<float> part) {
                                if (part[0] == 0.0f) throw Error("comm/test", "link down");
                              });
  std::vector<float> g(20);
  for (int i = 0; i < 20; ++i) g[i] = static_cast<float>(i);
  overlap.begin(g);
  overlap.ready({0, 20});
  EXPECT_THROW(overlap.finish(), Error);
  // The next step starts clean.
  for (float& x : g) x = 1.0f;
  overlap.begin(g);
  overlap.ready({0, 20});
  EXPECT_NO_THROW(overlap.finish());
}

TEST(Fusion, WaitInFlightReturnsOnceFewEnoughBucketsAreLeft) {
  // A reduce that holds each bucket until the test lets it go: with three buckets queued,
  // waiting for at most one in flight must block until two are reduced, and not longer.
  std::atomic<int> allowed{0}, reduced{0};
  OverlappedAllReduce overlap(plan_buckets(std::vector<GradRange>{{20, 30}, {10, 20}, {0, 10}}, 10 * 4),
                              [&](std::span<float>) {
                                const int mine = reduced.load();
                                while (allowed.load() <= mine) std::this_thread::yield();
                                ++reduced;
                              });
  std::vector<float> g(30, 1.0f);
  overlap.begin(g);
  overlap.ready({0, 30});
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    overlap.wait_in_flight(1);
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(returned.load()) << "three buckets in flight, at most one allowed";
  allowed = 1;
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(returned.load()) << "two buckets still in flight";
  allowed = 2;
  waiter.join();
  EXPECT_TRUE(returned.load());
  EXPECT_EQ(reduced.load(), 2);
  allowed = 3;
  overlap.finish();
  EXPECT_EQ(reduced.load(), 3);
}

}  // namespace
}  // namespace flotilla::comm
