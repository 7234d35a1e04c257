// The device mesh: tensor-parallel ranks adjacent, then pipeline, then data; each rank's
// group along a dimension is the ranks differing from it only there; the groups are real
// sub-communicators (ranks as threads), and a bad --parallel spec is one clear error.
#include "flotilla/parallel/mesh.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "flotilla/parallel/doctor.hpp"

namespace flotilla::parallel {
namespace {

TEST(MeshShape, ParsesKeysInAnyOrderWithOmittedOnesOne) {
  EXPECT_EQ(parse_mesh_shape("dp=2,pp=3,tp=4"), (MeshShape{2, 3, 4}));
  EXPECT_EQ(parse_mesh_shape("tp=2, dp=4"), (MeshShape{4, 1, 2}));
  EXPECT_EQ(parse_mesh_shape("dp=1"), (MeshShape{1, 1, 1}));
  EXPECT_EQ(parse_mesh_shape("dp=2,pp=1,tp=2").to_string(), "dp=2,pp=1,tp=2");
  EXPECT_EQ(parse_mesh_shape("ep=4"), (MeshShape{1, 1, 1, 4}));
  EXPECT_EQ(parse_mesh_shape("ep=2,dp=2").to_string(), "dp=2,pp=1,tp=1,ep=2");
}

TEST(MeshShape, RefusesABadSpecNamingIt) {
  for (const char* bad : {"", "dp=0", "tp=-2", "dp=two", "dp=2,xp=2", "ep=0", "dp", "dp=2,dp=2", "dp=2,", "pp=1.5"}) {
    try {
      parse_mesh_shape(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("--parallel"), std::string::npos) << e.what();
    }
  }
}

// Coordinates invert the rank formula, tensor-parallel ranks are adjacent, and every
// group has the extent of its dimension, its members agreeing on the other coordinates.
TEST(MeshCoords, EveryShapeOfUpToTwelveRanks) {
  for (int dp = 1; dp <= 3; ++dp)
    for (int pp = 1; pp <= 2; ++pp)
      for (int tp = 1; tp <= 2; ++tp)
      for (int ep = 1; ep <= 2; ++ep) {
        const MeshShape shape{dp, pp, tp, ep};
        std::set<std::vector<int>> tp_groups;
        for (int r = 0; r < shape.size(); ++r) {
          const MeshCoords c = mesh_coords(shape, r);
          EXPECT_EQ(mesh_rank(shape, c), r);
          EXPECT_EQ(c.tp, r % tp);
          EXPECT_EQ(c.dp, r / (ep * pp * tp));
          EXPECT_EQ(c.ep, r / (pp * tp) % ep);
          for (MeshDim d : {MeshDim::dp, MeshDim::pp, MeshDim::tp, MeshDim::ep}) {
            const std::vector<int> g = mesh_group_ranks(shape, r, d);
            ASSERT_EQ(static_cast<int>(g.size()), shape.extent(d));
            EXPECT_EQ(g[static_cast<size_t>(c.of(d))], r);
            for (int m : g) {
              const MeshCoords mc = mesh_coords(shape, m);
              for (MeshDim o : {MeshDim::dp, MeshDim::pp, MeshDim::tp, MeshDim::ep})
                if (o != d) EXPECT_EQ(mc.of(o), c.of(o));
            }
          }
          tp_groups.insert(mesh_group_ranks(shape, r, MeshDim::tp));
        }
        // tp groups are runs of consecutive ranks.
        for (const std::vector<int>& g : tp_groups)
          for (size_t i = 1; i < g.size(); ++i) EXPECT_EQ(g[i], g[i - 1] + 1);
      }
}

TEST(MeshCoords, DpTwoTpTwo) {
  const MeshShape shape{2, 1, 2};
  EXPECT_EQ(mesh_group_ranks(shape, 0, MeshDim::tp), (std::vector<int>{0, 1}));
  EXPECT_EQ(mesh_group_ranks(shape, 3, MeshDim::tp), (std::vector<int>{2, 3}));
  EXPECT_EQ(mesh_group_ranks(shape, 1, MeshDim::dp), (std::vector<int>{1, 3}));
  EXPECT_EQ(mesh_group_ranks(shape, 2, MeshDim::pp), (std::vector<int>{2}));
}

// Each rank sums its world rank over each of its groups: the sum names the members.
void check_groups_by_sums(const MeshShape& shape) {
  std::mutex m;
  std::vector<std::string> failures;
  comm::run_threads(shape.size(), [&](comm::Communicator& world) {
    Mesh mesh(world, shape);
    EXPECT_EQ(mesh.coords(), mesh_coords(shape, world.rank()));
    for (MeshDim d : {MeshDim::dp, MeshDim::pp, MeshDim::tp, MeshDim::ep}) {
      comm::Communicator& g = mesh.group(d);
      const std::vector<int> members = mesh_group_ranks(shape, world.rank(), d);
      int64_t expected = 0;
      for (int r : members) expected += r;
      std::vector<int64_t> v = {world.rank()};
      g.all_reduce(v, comm::ReduceOp::sum, {.name = "mesh test"});
      std::lock_guard lock(m);
      if (g.size() != shape.extent(d) || g.rank() != mesh.coords().of(d) || v[0] != expected)
        failures.push_back(fmt::format("rank {} dim {}: size {} rank {} sum {} (want {}, {}, {})", world.rank(),
                                       static_cast<int>(d), g.size(), g.rank(), v[0], shape.extent(d),
                                       mesh.coords().of(d), expected));
    }
  });
  EXPECT_TRUE(failures.empty()) << fmt::format("{}", fmt::join(failures, "\n"));
}

TEST(Mesh, GroupsAreRealSubCommunicators) {
  check_groups_by_sums({4, 1, 1});
  check_groups_by_sums({2, 1, 2});
  check_groups_by_sums({1, 2, 2});
  check_groups_by_sums({2, 3, 1});
  check_groups_by_sums({1, 1, 1, 4});
  check_groups_by_sums({2, 1, 1, 2});
  check_groups_by_sums({1, 2, 1, 2});
}

// dp=2 x ep=2: the expert-parallel group pairs ranks (0,1) and (2,3); the dp group, which
// holds the same experts, pairs (0,2) and (1,3); the data group is all four.
TEST(Mesh, ExpertParallelGroupsLieInsideData) {
  const MeshShape shape{2, 1, 1, 2};
  EXPECT_EQ(mesh_group_ranks(shape, 1, MeshDim::ep), (std::vector<int>{0, 1}));
  EXPECT_EQ(mesh_group_ranks(shape, 1, MeshDim::dp), (std::vector<int>{1, 3}));
  comm::run_threads(4, [&](comm::Communicator& world) {
    Mesh mesh(world, shape);
    EXPECT_EQ(mesh.ep_group().size(), 2);
    EXPECT_EQ(mesh.ep_group().rank(), world.rank() % 2);
    EXPECT_EQ(mesh.dp_group().rank(), world.rank() / 2);
    EXPECT_EQ(mesh.data_group().size(), 4);
    EXPECT_EQ(mesh.data_group().rank(), world.rank());
  });
}

TEST(Mesh, OneRankIsTheOneByOneByOneMesh) {
  comm::run_threads(1, [](comm::Communicator& world) {
    Mesh mesh(world, MeshShape{});
    EXPECT_EQ(mesh.dp_group().size(), 1);
    EXPECT_EQ(mesh.tp_group().size(), 1);
    EXPECT_EQ(mesh.pp_group().size(), 1);
    EXPECT_EQ(mesh.ep_group().size(), 1);
    EXPECT_EQ(mesh.data_group().size(), 1);
  });
}

TEST(MeshDoctor, WarnsOnlyWhereATensorParallelGroupSpansHosts) {
  // 2 hosts of 2 slots: tp=2 groups {0,1} and {2,3} each on one host.
  const std::vector<std::string> two_by_two = {"a", "a", "b", "b"};
  EXPECT_TRUE(mesh_placement_warnings({2, 1, 2}, two_by_two).empty());
  EXPECT_TRUE(mesh_placement_warnings({4, 1, 1}, two_by_two).empty());
  EXPECT_TRUE(mesh_placement_warnings({1, 2, 2}, two_by_two).empty());
  // 4 hosts of 1 slot: both tp groups cross the network.
  const std::vector<std::string> four = {"a", "b", "c", "d"};
  const std::vector<std::string> w = mesh_placement_warnings({2, 1, 2}, four);
  ASSERT_EQ(w.size(), 2u);
  EXPECT_NE(w[0].find("ranks 0,1 spans hosts a, b"), std::string::npos) << w[0];
  EXPECT_NE(w[1].find("ranks 2,3 spans hosts c, d"), std::string::npos) << w[1];
  // 3 slots per host with tp=2: the group {2,3} straddles the hosts.
  const std::vector<std::string> three = {"a", "a", "a", "b", "b", "b"};
  const std::vector<std::string> w3 = mesh_placement_warnings({3, 1, 2}, three);
  ASSERT_EQ(w3.size(), 1u);
  EXPECT_NE(w3[0].find("ranks 2,3 spans hosts a, b"), std::string::npos) << w3[0];
}

TEST(MeshDoctor, EveryGroupOfADimensionIsTimedAtOnce) {
  comm::run_threads(4, [](comm::Communicator& world) {
    Mesh mesh(world, MeshShape{2, 1, 2});
    const MeshReport r = run_mesh_doctor(mesh, {"h", "h", "h", "h"}, 4096);
    ASSERT_EQ(r.coords.size(), 4u);
    EXPECT_EQ(r.coords[3], (MeshCoords{1, 0, 1}));
    ASSERT_EQ(r.timings.size(), 2u);  // tp and dp; pp has one rank
    EXPECT_EQ(r.timings[0].name, "tp");
    EXPECT_EQ(r.timings[1].name, "dp");
    for (const MeshGroupTiming& t : r.timings) {
      EXPECT_EQ(t.group_size, 2);
      EXPECT_EQ(t.bytes, 4096u);
      EXPECT_GT(t.time_us, 0.0);
    }
  });
}

TEST(Mesh, AShapeThatIsNotTheWorldSizeIsAnInputError) {
  comm::run_threads(2, [](comm::Communicator& world) {
    EXPECT_THROW(Mesh(world, MeshShape{4, 1, 1}), InputError);
  });
}

}  // namespace
}  // namespace flotilla::parallel
