// The collective specification (tests/comm/collective_spec.hpp) on the MPI backend:
// one process per rank under mpirun (see CMakeLists.txt for the 1..4-rank runs). Every
// rank runs every test, in the same order; only rank 0 prints progress, every rank
// prints its own failures.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>

#include "../comm/collective_spec.hpp"
#include "mpi_test_main.hpp"
#include "flotilla/comm/mpi/mpi_runtime.hpp"
#include "flotilla/comm/world.hpp"

namespace flotilla::comm {
namespace {

Communicator* g_world = nullptr;  // owned by main; the tests' only shared state

class CommMpi : public ::testing::Test {
 protected:
  Communicator& world() { return *g_world; }
  bool alone() const { return g_world->size() < 2; }
  // A group of all ranks with its own settings (the world's stay untouched).
  std::unique_ptr<Communicator> group_with(const Settings& settings) {
    auto group = g_world->split(0, g_world->rank());
    group->set_settings(settings);
    return group;
  }
};

TEST_F(CommMpi, WorldIsMpiOnOneHost) {
  EXPECT_EQ(world().backend(), "mpi");
  EXPECT_GE(world().size(), 1);
  EXPECT_EQ(world().local_size(), world().size()) << "mpirun runs every rank on this host";
  EXPECT_EQ(world().local_rank(), world().rank());
  // Every rank reports the same host.
  std::vector<char> name(256, 0), names(256 * world().size());
  std::copy(world().host_name().begin(), world().host_name().end(), name.begin());
  world().all_gather(ConstView(std::as_bytes(std::span(name)), ElementType::u8, name.size()),
                     MutView(std::as_writable_bytes(std::span(names)), ElementType::u8,
                             names.size()));
  for (int r = 0; r < world().size(); ++r)
    EXPECT_STREQ(names.data() + 256 * r, world().host_name().c_str());
}

TEST_F(CommMpi, AllReduceMatchesClosedForm) { spec::all_reduce_closed_form(world()); }
TEST_F(CommMpi, BroadcastFromEveryRoot) { spec::broadcast_from_every_root(world()); }
TEST_F(CommMpi, AllGatherMatchesClosedForm) { spec::all_gather_closed_form(world()); }
TEST_F(CommMpi, ReduceScatterMatchesClosedForm) { spec::reduce_scatter_closed_form(world()); }
TEST_F(CommMpi, AllToAllMatchesClosedForm) { spec::all_to_all_closed_form(world()); }
TEST_F(CommMpi, AllToAllVMatchesClosedForm) { spec::all_to_all_v_closed_form(world(), 20261207); }
TEST_F(CommMpi, HalfTypesMoveButDoNotReduce) { spec::half_types_move_but_do_not_reduce(world()); }
TEST_F(CommMpi, BarrierManyTimes) { spec::barrier_many_times(world()); }
TEST_F(CommMpi, SplitEvenOdd) { spec::split_even_odd(world()); }
TEST_F(CommMpi, SplitWithoutColor) { spec::split_without_color(world()); }
TEST_F(CommMpi, RingExchangeNonblocking) { spec::ring_exchange_nonblocking(world()); }
TEST_F(CommMpi, BlockingPairs) { spec::blocking_pairs(world()); }

TEST_F(CommMpi, CollectivesWithTheCheckOff) {
  Settings settings = world().settings();
  settings.check_mismatch = false;
  auto group = group_with(settings);
  spec::all_reduce_closed_form(*group);
  spec::barrier_many_times(*group);
  spec::split_even_odd(*group);
}

TEST_F(CommMpi, CollectivesWithTheHashCheck) {
  Settings settings = world().settings();
  settings.protocol = CheckProtocol::hash;
  auto group = group_with(settings);
  spec::all_to_all_closed_form(*group);
  spec::split_even_odd(*group);
}

TEST_F(CommMpi, RecvOfWrongSizeIsAnError) {
  if (alone()) GTEST_SKIP() << "needs two ranks";
  spec::recv_of_wrong_size_is_an_error(world());
}

TEST_F(CommMpi, UnansweredRecvTimesOutAndCancels) {
  if (alone()) GTEST_SKIP() << "needs two ranks";
  spec::unanswered_recv_times_out_and_cancels(world());
}

TEST_F(CommMpi, MismatchNamesRanksAndOperations) {
  if (alone()) GTEST_SKIP() << "needs two ranks";
  spec::mismatch_names_ranks_and_operations(world());
}

TEST_F(CommMpi, MismatchWithTheHashCheck) {
  if (alone()) GTEST_SKIP() << "needs two ranks";
  Settings settings = world().settings();
  settings.protocol = CheckProtocol::hash;
  auto group = group_with(settings);
  spec::mismatch_names_ranks_and_operations(*group);
}

TEST_F(CommMpi, SilentRankTimesOut) {
  if (alone()) GTEST_SKIP() << "needs two ranks";
  spec::silent_rank_times_out(world());
}

// The hash check cannot tell who is late, but still bounds the wait.
TEST_F(CommMpi, SilentRankTimesOutWithTheHashCheck) {
  if (alone()) GTEST_SKIP() << "needs two ranks";
  Settings settings = world().settings();
  settings.protocol = CheckProtocol::hash;
  auto group = group_with(settings);
  spec::silent_rank_times_out(*group, /*names_late_ranks=*/false);
}

}  // namespace
}  // namespace flotilla::comm

int main(int argc, char** argv) {
  return flotilla::testing::run_mpi_tests(argc, argv, std::chrono::seconds(20), flotilla::comm::g_world);
}
