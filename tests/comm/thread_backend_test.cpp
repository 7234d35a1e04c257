// The collective specification (collective_spec.hpp) on the thread backend, for groups
// of 1 to 5 ranks (non-powers of two included), plus what is particular to threads.
#include <gtest/gtest.h>

#include "collective_spec.hpp"
#include "flotilla/comm/thread/thread_group.hpp"

namespace flotilla::comm {
namespace {

class CommThreadSizes : public ::testing::TestWithParam<int> {
 protected:
  // Every spec runs with a deadline short enough that a bug shows as a failure, not a
  // stuck test, and long enough for five threads on two shared cores.
  void run(void (*spec)(Communicator&)) {
    Settings settings;
    settings.timeout = std::chrono::seconds(20);
    run_threads(GetParam(), spec, settings);
  }
};

TEST_P(CommThreadSizes, AllReduceMatchesClosedForm) { run(spec::all_reduce_closed_form); }
TEST_P(CommThreadSizes, BroadcastFromEveryRoot) { run(spec::broadcast_from_every_root); }
TEST_P(CommThreadSizes, AllGatherMatchesClosedForm) { run(spec::all_gather_closed_form); }
TEST_P(CommThreadSizes, ReduceScatterMatchesClosedForm) { run(spec::reduce_scatter_closed_form); }
TEST_P(CommThreadSizes, AllToAllMatchesClosedForm) { run(spec::all_to_all_closed_form); }
TEST_P(CommThreadSizes, HalfTypesMoveButDoNotReduce) { run(spec::half_types_move_but_do_not_reduce); }
TEST_P(CommThreadSizes, BarrierManyTimes) { run(spec::barrier_many_times); }
TEST_P(CommThreadSizes, SplitEvenOdd) { run(spec::split_even_odd); }
TEST_P(CommThreadSizes, SplitWithoutColor) { run(spec::split_without_color); }
TEST_P(CommThreadSizes, RingExchangeNonblocking) { run(spec::ring_exchange_nonblocking); }
TEST_P(CommThreadSizes, BlockingPairs) { run(spec::blocking_pairs); }

// Behaviours between two or more ranks.
class CommThreadPeers : public CommThreadSizes {};

TEST_P(CommThreadPeers, RecvOfWrongSizeIsAnError) { run(spec::recv_of_wrong_size_is_an_error); }
TEST_P(CommThreadPeers, UnansweredRecvTimesOutAndCancels) {
  run(spec::unanswered_recv_times_out_and_cancels);
}
TEST_P(CommThreadPeers, MismatchNamesRanksAndOperations) {
  run(spec::mismatch_names_ranks_and_operations);
}
TEST_P(CommThreadPeers, SilentRankTimesOut) {
  run([](Communicator& c) { spec::silent_rank_times_out(c); });
}

auto size_name = [](const auto& info) { return "ranks" + std::to_string(info.param); };
INSTANTIATE_TEST_SUITE_P(Comm, CommThreadSizes, ::testing::Values(1, 2, 3, 4, 5), size_name);
INSTANTIATE_TEST_SUITE_P(Comm, CommThreadPeers, ::testing::Values(2, 3, 4, 5), size_name);

// The check is free on threads and guards memory safety, so switching it off does not
// switch it off here.
TEST(CommThread, MismatchIsCaughtEvenWithTheCheckOff) {
  Settings settings;
  settings.check_mismatch = false;
  settings.timeout = std::chrono::seconds(20);
  run_threads(3, spec::mismatch_names_ranks_and_operations, settings);
}

TEST(CommThread, SendToSelfIsDelivered) {
  run_threads(1, [](Communicator& c) {
    std::vector<int32_t> out = {4, 5}, in(2);
    Request r = c.irecv(in, 0, 0);
    c.send(out, 0, 0);
    r.wait();
    EXPECT_EQ(in, out);
  });
}

TEST(CommThread, RunThreadsRethrowsTheLowestRanksError) {
  try {
    run_threads(3, [](Communicator& c) {
      if (c.rank() >= 1) throw Error("test", "rank " + std::to_string(c.rank()));
    });
    FAIL() << "the error was swallowed";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "[test] rank 1");
  }
}

TEST(CommThread, IdentityIsOneHost) {
  run_threads(3, [](Communicator& c) {
    EXPECT_EQ(c.backend(), "thread");
    EXPECT_EQ(c.size(), 3);
    EXPECT_EQ(c.local_size(), 3);
    EXPECT_EQ(c.local_rank(), c.rank());
    EXPECT_FALSE(c.host_name().empty());
  });
}

TEST(CommThread, BadArgumentsAreRefusedLocally) {
  run_threads(2, [](Communicator& c) {
    std::vector<float> a(4), b(5);
    EXPECT_THROW(c.all_reduce(a, b, ReduceOp::sum), Error);
    EXPECT_THROW(c.broadcast(a, 2), Error);
    EXPECT_THROW(c.all_gather(a, b), Error);
    EXPECT_THROW(c.reduce_scatter(b, a, ReduceOp::sum), Error);
    EXPECT_THROW(c.all_to_all(b, b), Error);
    EXPECT_THROW((void)c.isend(a, 2, 0), Error);
    EXPECT_THROW((void)c.isend(a, 1, Communicator::kMaxTag + 1), Error);
    std::vector<float> whole(8);
    // Partly overlapping in and out.
    EXPECT_THROW(c.all_reduce(std::span<const float>(whole).subspan(0, 4),
                              std::span<float>(whole).subspan(2, 4), ReduceOp::sum),
                 Error);
    EXPECT_EQ(c.collectives_started(), 0u) << "refused calls must not take a number";
  });
}

}  // namespace
}  // namespace flotilla::comm
