// The size-1 group: the same specification as every backend, plus its refusals.
#include <gtest/gtest.h>

#include "collective_spec.hpp"
#include "flotilla/comm/local/local_communicator.hpp"
#include "flotilla/comm/world.hpp"

namespace flotilla::comm {
namespace {

TEST(CommLocal, IsRankZeroOfOne) {
  auto c = make_local();
  EXPECT_EQ(c->backend(), "local");
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  EXPECT_EQ(c->local_rank(), 0);
  EXPECT_EQ(c->local_size(), 1);
  EXPECT_FALSE(c->host_name().empty());
}

TEST(CommLocal, CollectivesMatchTheSpecification) {
  auto c = make_local();
  spec::all_reduce_closed_form(*c);
  spec::broadcast_from_every_root(*c);
  spec::all_gather_closed_form(*c);
  spec::reduce_scatter_closed_form(*c);
  spec::all_to_all_closed_form(*c);
  spec::half_types_move_but_do_not_reduce(*c);
  spec::barrier_many_times(*c);
  spec::split_even_odd(*c);
  EXPECT_GT(c->collectives_started(), 100u);
}

TEST(CommLocal, SplitWithNegativeColorGivesNoGroup) {
  auto c = make_local();
  EXPECT_EQ(c->split(-1, 0), nullptr);
  auto same = c->split(3, 0);
  ASSERT_NE(same, nullptr);
  EXPECT_EQ(same->size(), 1);
}

TEST(CommLocal, SendToSelfIsAClearError) {
  auto c = make_local();
  std::vector<float> data(3);
  try {
    c->send(data, 0, 0);
    FAIL() << "send to self must be refused";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(),
                 "[comm/local] rank 0: send to itself is not supported by the size-1 local group");
  }
  EXPECT_THROW(c->recv(data, 0, 0), Error);
  EXPECT_THROW(c->send(data, 1, 0), Error);  // no rank 1 either
}

TEST(CommLocal, MakeWorldOutsideALauncherIsLocal) {
  if (launched_under_mpi()) GTEST_SKIP() << "this test process runs under an MPI launcher";
  auto world = make_world();
  EXPECT_EQ(world->backend(), "local");
  EXPECT_EQ(world->size(), 1);
}

TEST(CommLaunchDetection, RecognisesLaunchers) {
  auto env = [](std::initializer_list<std::pair<const char*, const char*>> vars) {
    std::vector<std::pair<std::string, std::string>> table;
    for (auto [k, v] : vars) table.emplace_back(k, v);
    return [table](const char* name) -> const char* {
      for (const auto& [k, v] : table)
        if (k == name) return v.c_str();
      return nullptr;
    };
  };
  EXPECT_FALSE(launched_under_mpi(env({})));
  EXPECT_TRUE(launched_under_mpi(env({{"OMPI_COMM_WORLD_SIZE", "1"}})));
  EXPECT_TRUE(launched_under_mpi(env({{"PMI_SIZE", "4"}})));
  EXPECT_TRUE(launched_under_mpi(env({{"PMIX_RANK", "0"}})));
  EXPECT_TRUE(launched_under_mpi(env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}})));
  // A one-task Slurm allocation (an interactive shell, a batch script) is not an MPI job.
  EXPECT_FALSE(launched_under_mpi(env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}})));
  EXPECT_FALSE(launched_under_mpi(env({{"SLURM_NTASKS", "8"}})));
  EXPECT_FALSE(launched_under_mpi(env({{"OMPI_COMM_WORLD_SIZE", ""}})));
}

}  // namespace
}  // namespace flotilla::comm
