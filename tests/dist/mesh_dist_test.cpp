// The device mesh on MPI ranks (run with mpirun -np 4): every shape of 4 ranks splits the
// world into groups of the sizes the shape says, each rank at its coordinate in them, and a
// collective over a group reaches exactly its members.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "flotilla/parallel/mesh.hpp"
#include "mpi_test_main.hpp"

namespace flotilla::parallel {
namespace {

comm::Communicator* g_world = nullptr;

void check_mesh(const MeshShape& shape) {
  comm::Communicator& world = *g_world;
  ASSERT_EQ(world.size(), shape.size()) << "run this test under mpirun -np " << shape.size();
  Mesh mesh(world, shape);
  EXPECT_EQ(mesh.coords(), mesh_coords(shape, world.rank()));
  for (MeshDim d : {MeshDim::dp, MeshDim::pp, MeshDim::tp}) {
    comm::Communicator& g = mesh.group(d);
    EXPECT_EQ(g.size(), shape.extent(d)) << shape.to_string() << " dim " << static_cast<int>(d);
    EXPECT_EQ(g.rank(), mesh.coords().of(d));
    int64_t expected = 0;
    for (int r : mesh_group_ranks(shape, world.rank(), d)) expected += r;
    std::vector<int64_t> sum = {world.rank()};
    g.all_reduce(sum, comm::ReduceOp::sum, {.name = "mesh members"});
    EXPECT_EQ(sum[0], expected) << shape.to_string() << " dim " << static_cast<int>(d);
  }
}

TEST(MeshMpi, DataParallelOverFour) { check_mesh({4, 1, 1}); }
TEST(MeshMpi, TwoReplicasOfTwoTensorParallelRanks) { check_mesh({2, 1, 2}); }
TEST(MeshMpi, TwoStagesOfTwoTensorParallelRanks) { check_mesh({1, 2, 2}); }
TEST(MeshMpi, TwoReplicasOfTwoStages) { check_mesh({2, 2, 1}); }

}  // namespace
}  // namespace flotilla::parallel

int main(int argc, char** argv) {
  return flotilla::testing::run_mpi_tests(argc, argv, std::chrono::seconds(20), flotilla::parallel::g_world);
}
