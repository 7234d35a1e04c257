// The main() of a GoogleTest binary run as every rank of an mpirun job: MPI starts first,
// `world` points at the MPI world while the tests run, only rank 0 narrates (the others
// print just their failures, prefixed with their rank), and every rank's verdict counts:
// a failure on rank 3 fails the run on rank 0 too.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <vector>

#include "flotilla/comm/mpi/mpi_runtime.hpp"
#include "flotilla/comm/world.hpp"

namespace flotilla::testing {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.message());
  }

 private:
  int rank_;
};

// `timeout`: every collective's deadline. A failing rank desynchronises the others; they
// learn it from a mismatch or this deadline, well inside ctest's timeout.
inline int run_mpi_tests(int argc, char** argv, std::chrono::seconds timeout, comm::Communicator*& world_ptr) {
  ::testing::InitGoogleTest(&argc, argv);
  try {
    comm::MpiRuntime runtime(&argc, &argv);
    comm::Settings settings;
    settings.timeout = timeout;
    auto world = comm::make_world(settings);
    world_ptr = world.get();
    if (world->rank() != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new RankFailurePrinter(world->rank()));
    }
    const int failed = RUN_ALL_TESTS();
    std::vector<int32_t> any_failed = {failed != 0};
    world->all_reduce(any_failed, comm::ReduceOp::max, {.name = "verdict"});
    world_ptr = nullptr;
    world.reset();
    return any_failed[0];
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    comm::MpiRuntime::abort(3);
  }
}

}  // namespace flotilla::testing
