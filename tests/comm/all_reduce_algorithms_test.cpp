// flotilla's own all-reduce algorithms (comm/algorithms/) on the thread backend: worlds of
// 1 to 5 ranks (non-powers of two included), buffers shorter than the world, every
// algorithm, closed-form expected values (all_reduce_algorithm_spec.hpp); then the
// chooser, mismatches and timeouts.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "all_reduce_algorithm_spec.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "../bounded_settings.hpp"

namespace flotilla::comm {
namespace {

class AllReduceAlgorithms : public ::testing::TestWithParam<int> {};

TEST_P(AllReduceAlgorithms, MatchClosedForm) {
  run_threads(GetParam(), algorithm_spec::every_configuration, testing::bounded_settings());
}

TEST_P(AllReduceAlgorithms, GiveIdenticalBitsOnEveryRank) {
  run_threads(GetParam(), algorithm_spec::identical_bits_on_every_rank, testing::bounded_settings());
}

INSTANTIATE_TEST_SUITE_P(Comm, AllReduceAlgorithms, ::testing::Values(1, 2, 3, 4, 5),
                         [](const auto& info) { return "ranks" + std::to_string(info.param); });

TEST(AllReduceChooser, SmallToHalvingDoublingLargeToRing) {
  const Topology one_host{1, 0, 4};
  EXPECT_EQ(choose_algorithm(4 << 10, 4, one_host), AllReduceAlgorithm::halving_doubling);
  EXPECT_EQ(choose_algorithm(16 << 20, 4, one_host), AllReduceAlgorithm::ring);
  EXPECT_EQ(choose_algorithm(16 << 20, 3, Topology{3, 0, 1}), AllReduceAlgorithm::ring);
}

TEST(AllReduceChooser, OneHostWithAnArenaGoesHierarchicalFromHalfAMebibyte) {
  const Topology one_host{1, 0, 4};
  EXPECT_EQ(choose_algorithm(4 << 10, 4, one_host, true), AllReduceAlgorithm::halving_doubling);
  EXPECT_EQ(choose_algorithm(256 << 10, 4, one_host, true), AllReduceAlgorithm::ring);
  EXPECT_EQ(choose_algorithm(512 << 10, 4, one_host, true), AllReduceAlgorithm::hierarchical);
  EXPECT_EQ(choose_algorithm(16 << 20, 2, Topology{1, 0, 2}, true), AllReduceAlgorithm::hierarchical);
  // Without the arena hierarchical is chains of messages inside the host: the ring is better.
  EXPECT_EQ(choose_algorithm(16 << 20, 4, one_host, false), AllReduceAlgorithm::ring);
}

TEST(AllReduceChooser, SeveralRanksOnSeveralHostsGoHierarchical) {
  EXPECT_EQ(choose_algorithm(16 << 20, 8, Topology{2, 0, 4}),
            AllReduceAlgorithm::hierarchical);
  EXPECT_EQ(choose_algorithm(4 << 10, 8, Topology{2, 0, 4}),
            AllReduceAlgorithm::halving_doubling);
}

TEST(AllReduceChooser, FlagsRoundTrip) {
  for (auto a : {AllReduceAlgorithm::automatic, AllReduceAlgorithm::ring,
                 AllReduceAlgorithm::halving_doubling, AllReduceAlgorithm::hierarchical,
                 AllReduceAlgorithm::backend})
    EXPECT_EQ(parse_algorithm(algorithm_flag(a)), a);
  EXPECT_THROW(parse_algorithm("tree"), Error);
}

TEST(AllReduceTopology, FakeHostsGroupConsecutiveRanks) {
  run_threads(5, [](Communicator& c) {
    const Topology t = Topology::discover(c, 2);
    EXPECT_EQ(t.hosts, 3);
    EXPECT_EQ(t.host, c.rank() / 2);
    EXPECT_EQ(t.max_ranks_per_host, 2);
    const Topology real = Topology::discover(c);  // threads share one host
    EXPECT_EQ(real.hosts, 1);
    EXPECT_EQ(real.max_ranks_per_host, 5);
  }, testing::bounded_settings());
}

// Ranks running different algorithms on the same buffer: every rank gets a
// MismatchError naming both, none hangs.
TEST(AllReduceMismatch, DifferentAlgorithmsAreAnErrorOnEveryRank) {
  std::atomic<int> mismatches = 0;
  run_threads(3, [&](Communicator& c) {
    AllReducer::Config config;
    config.algorithm = c.rank() == 1 ? AllReduceAlgorithm::halving_doubling
                                     : AllReduceAlgorithm::ring;
    AllReducer reducer(c, config);
    std::vector<float> grads(100, 1.0f);
    try {
      reducer.run(grads, ReduceOp::sum, {.name = "grads"});
      ADD_FAILURE() << "rank " << c.rank() << " ran a mismatched all_reduce";
    } catch (const MismatchError& e) {
      ++mismatches;
      const std::string what = e.what();
      EXPECT_NE(what.find("ring:grads"), std::string::npos) << what;
      EXPECT_NE(what.find("hd:grads"), std::string::npos) << what;
    }
    // A mismatch leaves the group in step and usable.
    ring_all_reduce(c, grads, ReduceOp::sum, {.name = "grads"});
    EXPECT_EQ(grads[0], 3.0f);
  }, testing::bounded_settings());
  EXPECT_EQ(mismatches.load(), 3);
}

// A rank that never arrives: the others give up at the deadline with a TimeoutError and
// the communicator refuses further work. With the mismatch check off, so that the
// timeout happens inside the ring's own transfers, not in the check.
TEST(AllReduceTimeout, SilentRankTimesOutInsideTheRing) {
  Settings settings = testing::bounded_settings();
  settings.check_mismatch = false;
  run_threads(3, [](Communicator& c) {
    AllReducer reducer(c, {.algorithm = AllReduceAlgorithm::ring});
    const auto timeout = std::chrono::milliseconds(300);
    if (c.rank() == 2) {
      std::this_thread::sleep_for(timeout + std::chrono::milliseconds(700));
      return;
    }
    std::vector<float> grads(1000, 1.0f);
    Timer timer;
    EXPECT_THROW(reducer.run(grads, ReduceOp::sum, {.name = "grads", .timeout = timeout}),
                 TimeoutError);
    EXPECT_GE(timer.elapsed_s(), 0.29);
    EXPECT_LT(timer.elapsed_s(), 1.3);
    EXPECT_THROW(c.barrier(), Error);  // unusable after a timeout
  }, settings);
}

}  // namespace
}  // namespace flotilla::comm

namespace flotilla::comm {
namespace {

// Ranks of one machine get a shared-memory arena per host (threads of one process map it
// like processes do); a host of one rank needs none.
TEST(AllReduceHostShm, ArenaForEveryHostOfSeveralRanks) {
  run_threads(5, [](Communicator& c) {
    const HostGroups g = HostGroups::split(c, Topology::discover(c, 2));
    EXPECT_EQ(g.shm != nullptr, g.host->size() > 1) << "rank " << c.rank();
    const HostGroups off = HostGroups::split(c, Topology::discover(c, 2), false);
    EXPECT_EQ(off.shm, nullptr);
  }, testing::bounded_settings());
}

// Many segments through the arena's double-buffered slots, several calls in a row (the
// counters run on across calls), against the closed form.
TEST(AllReduceHostShm, ManySegmentsManyCalls) {
  run_threads(5, [](Communicator& c) {
    for (int per_host : {2, 3, 5}) {
      AllReducer reducer(c, {.algorithm = AllReduceAlgorithm::hierarchical,
                             .fake_ranks_per_host = per_host});
      for (int call = 0; call < 3; ++call) {
        std::vector<int32_t> data((HostShm::kSegmentBytes / 4) * 4 + 7);  // 4+ segments
        for (size_t i = 0; i < data.size(); ++i)
          data[i] = static_cast<int32_t>(i % 1000) * (c.rank() + 1) + call;
        reducer.run(data, ReduceOp::sum);
        for (size_t i = 0; i < data.size(); ++i)
          ASSERT_EQ(data[i], static_cast<int32_t>(i % 1000) * 15 + 5 * call)
              << per_host << " per host, call " << call << ", at " << i;
      }
    }
  }, testing::bounded_settings());
}

}  // namespace
}  // namespace flotilla::comm
