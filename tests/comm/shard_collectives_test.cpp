// ZeRO's reduce-scatter and all-gather (comm/algorithms/all_reduce.hpp): the ring's halves,
// the host's shared memory and the backend's own, on the thread backend for worlds of 1 to
// 5 ranks, against closed forms; several calls in a row and interleaved with the
// hierarchical all-reduce (the arena's counters run on across calls and families); float
// sums in rank order, identical whichever path; mismatches and bad sizes.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/comm/algorithms/all_reduce.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "../bounded_settings.hpp"

namespace flotilla::comm {
namespace {

// Rank `rank`'s element i of chunk `chunk`: distinct in every argument, exact in int32.
int32_t value(int rank, int chunk, size_t i) {
  return static_cast<int32_t>((i % 997) * 7 + static_cast<size_t>(chunk) * 100003) * (rank + 1) + rank;
}

struct Case {
  std::string label;
  AllReducer::Config config;
};

std::vector<Case> cases(int n) {
  std::vector<Case> out;
  AllReducer::Config ring{.algorithm = AllReduceAlgorithm::ring};
  out.push_back({"ring", ring});
  ring.tuning.segment_bytes = 12;
  ring.tuning.window = 2;
  out.push_back({"ring tiny segments", ring});
  out.push_back({"shm", AllReducer::Config{}});  // automatic: one host with an arena
  out.push_back({"mpi", AllReducer::Config{.algorithm = AllReduceAlgorithm::backend}});
  (void)n;
  return out;
}

// Per-rank chunk lengths: empty, shorter than anything, and beyond one arena segment's
// pieces (HostShm::kScatterSlotBytes / 4 / n floats each) so that several segments run.
std::vector<size_t> chunk_lengths(int n) {
  return {0, 1, 5, 1000, HostShm::kScatterSlotBytes / 4 / static_cast<size_t>(n) * 2 + 3};
}

void closed_form(Communicator& c) {
  const int n = c.size();
  for (const Case& k : cases(n)) {
    AllReducer reducer(c, k.config);
    if (k.label == "shm" && n > 1) ASSERT_EQ(reducer.shard_algorithm(), ShardAlgorithm::shm);
    for (int call = 0; call < 2; ++call)
      for (size_t len : chunk_lengths(n)) {
        std::vector<int32_t> data(len * static_cast<size_t>(n));
        for (int r = 0; r < n; ++r)
          for (size_t i = 0; i < len; ++i) data[r * len + i] = value(c.rank(), r, i) + call;
        reducer.reduce_scatter(data, ReduceOp::sum, {.name = "rs"});
        for (size_t i = 0; i < len; ++i) {
          int32_t want = 0;
          for (int q = 0; q < n; ++q) want += value(q, c.rank(), i) + call;
          ASSERT_EQ(data[c.rank() * len + i], want) << k.label << ", chunk " << len << ", at " << i;
        }
        // All-gather: only our chunk is ours; the others are garbage before.
        for (int r = 0; r < n; ++r)
          for (size_t i = 0; i < len; ++i) data[r * len + i] = r == c.rank() ? value(r, r, i) - call : -1;
        reducer.all_gather(data, {.name = "ag"});
        for (int r = 0; r < n; ++r)
          for (size_t i = 0; i < len; ++i)
            ASSERT_EQ(data[r * len + i], value(r, r, i) - call)
                << k.label << ", chunk " << len << ", chunk of rank " << r << " at " << i;
        // The all-reduce's arena runs between them: neither family's counters disturb the other.
        std::vector<int32_t> sum(len + 3, c.rank());
        reducer.run(sum, ReduceOp::sum);
        ASSERT_EQ(sum.front(), n * (n - 1) / 2) << k.label;
      }
  }
}

class ShardCollectives : public ::testing::TestWithParam<int> {};

TEST_P(ShardCollectives, MatchClosedForm) { run_threads(GetParam(), closed_form, testing::bounded_settings()); }

// Float sums: the ring, the arena and the backend may add in different orders, but each
// gives every rank's owner one result, and the arena's is the sum in rank order exactly.
TEST_P(ShardCollectives, ArenaSumsInRankOrder) {
  run_threads(GetParam(), [](Communicator& c) {
    const int n = c.size();
    const size_t len = 70001;
    auto x = [](int rank, size_t j) {
      return static_cast<float>(std::sin(0.37 * static_cast<double>(j) + rank) / (rank + 3.0));
    };
    AllReducer reducer(c);
    std::vector<float> data(len * static_cast<size_t>(n));
    for (size_t j = 0; j < data.size(); ++j) data[j] = x(c.rank(), j);
    reducer.reduce_scatter(data, ReduceOp::sum);
    for (size_t i = 0; i < len; ++i) {
      const size_t j = static_cast<size_t>(c.rank()) * len + i;
      float want = x(0, j);
      for (int q = 1; q < n; ++q) want += x(q, j);
      ASSERT_EQ(data[j], want) << "at " << i;
    }
  }, testing::bounded_settings());
}

INSTANTIATE_TEST_SUITE_P(Comm, ShardCollectives, ::testing::Values(1, 2, 3, 4, 5),
                         [](const auto& info) { return "ranks" + std::to_string(info.param); });

TEST(ShardCollectivesErrors, ACountThatDoesNotCutIntoEqualChunksIsAnError) {
  run_threads(3, [](Communicator& c) {
    for (auto a : {AllReduceAlgorithm::ring, AllReduceAlgorithm::automatic}) {
      AllReducer reducer(c, {.algorithm = a});
      std::vector<float> data(10);
      try {
        reducer.reduce_scatter(data, ReduceOp::sum);
        ADD_FAILURE() << "10 floats cut into 3 chunks";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("10 elements do not cut into 3 equal chunks"), std::string::npos)
            << e.what();
      }
    }
  }, testing::bounded_settings());
}

// `--allreduce ring` on one rank and the default on another: every rank gets a
// MismatchError naming both, none hangs, and the group stays usable.
TEST(ShardCollectivesErrors, RanksOnDifferentAlgorithmsGetAMismatch) {
  run_threads(2, [](Communicator& c) {
    AllReducer reducer(c, {.algorithm = c.rank() == 0 ? AllReduceAlgorithm::ring : AllReduceAlgorithm::automatic});
    std::vector<float> data(64, 1.0f);
    try {
      reducer.all_gather(data, {.name = "weights"});
      ADD_FAILURE() << "rank " << c.rank() << " ran a mismatched all_gather";
    } catch (const MismatchError& e) {
      EXPECT_NE(std::string(e.what()).find("ring:weights"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("shm:weights"), std::string::npos) << e.what();
    }
    ring_reduce_scatter(c, data, ReduceOp::sum);
    EXPECT_EQ(data[static_cast<size_t>(c.rank()) * 32], 2.0f);
  }, testing::bounded_settings());
}

// The arena's waits sleep on its doorbell once a short poll is over. A peer that comes
// late (here 200 ms, well past the poll) wakes the sleeper with its publication and every
// rank's chunk arrives; a peer that never comes is a TimeoutError at the deadline, not
// later. The mismatch check is off, so that both waits happen inside the arena.
TEST(ShardCollectivesErrors, ArenaSleepersWakeForALatePeerAndTimeOutForALostOne) {
  Settings settings = testing::bounded_settings();
  settings.check_mismatch = false;
  run_threads(2, [](Communicator& c) {
    AllReducer reducer(c, {});
    ASSERT_EQ(reducer.shard_algorithm(), ShardAlgorithm::shm);
    const size_t n = HostShm::kScatterSlotBytes / 4 + 5;  // two segments a rank
    std::vector<float> data(2 * n, -1.0f);
    for (size_t i = 0; i < n; ++i) data[static_cast<size_t>(c.rank()) * n + i] = static_cast<float>(c.rank() * 10 + i % 7);
    if (c.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    reducer.all_gather(data, {.name = "late"});
    for (int r = 0; r < 2; ++r)
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(data[static_cast<size_t>(r) * n + i], static_cast<float>(r * 10 + i % 7)) << "chunk " << r << ", at " << i;
    const auto timeout = std::chrono::milliseconds(300);
    if (c.rank() == 1) {
      std::this_thread::sleep_for(timeout + std::chrono::milliseconds(700));
      return;
    }
    Timer timer;
    EXPECT_THROW(reducer.all_gather(data, {.name = "lost", .timeout = timeout}), TimeoutError);
    EXPECT_GE(timer.elapsed_s(), 0.29);
    EXPECT_LT(timer.elapsed_s(), 1.0);
  }, settings);
}

}  // namespace
}  // namespace flotilla::comm
