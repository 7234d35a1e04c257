// flotilla's own all-reduce algorithms (comm/algorithms/) under mpirun, one process per
// rank (CMakeLists.txt runs 2..5 ranks): each algorithm against the MPI library's own
// MPI_Allreduce on the same random inputs, integers exactly and floats within 1e-6
// relative; then the closed-form specification (tests/comm/all_reduce_algorithm_spec.hpp)
// on real processes. Only rank 0 narrates; every rank reports its failures.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <thread>

#include "../comm/all_reduce_algorithm_spec.hpp"
#include "flotilla/comm/mpi/mpi_communicator.hpp"
#include "mpi_test_main.hpp"
#include "flotilla/comm/mpi/mpi_runtime.hpp"
#include "flotilla/comm/world.hpp"
#include "../test_seed.hpp"

namespace flotilla::comm {
namespace {

Communicator* g_world = nullptr;  // owned by main; the tests' only shared state

// Every rank's seed must differ (different inputs) yet be reproducible from rank 0's.
uint64_t shared_seed() {
  std::vector<int64_t> seed = {static_cast<int64_t>(g_world->rank() == 0 ? testing::test_seed() : 0)};
  g_world->broadcast(seed, 0);
  return static_cast<uint64_t>(seed[0]);
}

template <class T>
void against_mpi_allreduce(AllReducer& reducer, const std::string& label, uint64_t seed) {
  Communicator& c = reducer.communicator();
  std::mt19937_64 rng(seed + 7919 * static_cast<uint64_t>(c.rank()));
  for (size_t len : algorithm_spec::lengths_for(c.size())) {
    std::vector<T> mine(len);  // (len)
    for (auto& v : mine) {
      if constexpr (std::is_floating_point_v<T>)
        v = static_cast<T>(std::uniform_real_distribution<double>(-1.0, 1.0)(rng));
      else
        v = static_cast<T>(rng());  // full range: integer sums wrap, identically in both
    }
    std::vector<T> ours = mine, theirs = mine, magnitude = mine;
    reducer.run(ours, ReduceOp::sum, {.name = "vs mpi"});
    mpi_reference_all_reduce(c, theirs, ReduceOp::sum);
    if constexpr (std::is_floating_point_v<T>) {
      // Relative to the sum of magnitudes: a sum near zero of terms near one carries
      // their rounding, whichever order adds them.
      for (auto& m : magnitude) m = std::abs(m);
      mpi_reference_all_reduce(c, magnitude, ReduceOp::sum);
    }
    for (size_t i = 0; i < len; ++i) {
      if constexpr (std::is_floating_point_v<T>) {
        ASSERT_LE(std::abs(static_cast<double>(ours[i]) - theirs[i]), 1e-6 * magnitude[i])
            << label << " len " << len << " at " << i;
      } else {
        ASSERT_EQ(ours[i], theirs[i]) << label << " len " << len << " at " << i;
      }
    }
  }
}

TEST(AllReduceMpi, EveryAlgorithmMatchesMpiAllreduce) {
  const uint64_t seed = shared_seed();
  for (auto& [label, config] : algorithm_spec::configurations(g_world->size())) {
    AllReducer reducer(*g_world, config);
    against_mpi_allreduce<int32_t>(reducer, label + " i32", seed);
    against_mpi_allreduce<int64_t>(reducer, label + " i64", seed);
    against_mpi_allreduce<float>(reducer, label + " f32", seed);
    against_mpi_allreduce<double>(reducer, label + " f64", seed);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(AllReduceMpi, ClosedFormOnProcesses) { algorithm_spec::every_configuration(*g_world); }

TEST(AllReduceMpi, IdenticalBitsOnEveryRank) {
  algorithm_spec::identical_bits_on_every_rank(*g_world);
}

// A large buffer, many segments, every algorithm: the pipelining under real transfers.
TEST(AllReduceMpi, LargeBufferManySegments) {
  for (auto a : {AllReduceAlgorithm::ring, AllReduceAlgorithm::halving_doubling,
                 AllReduceAlgorithm::hierarchical}) {
    AllReducer::Config config;
    config.algorithm = a;
    config.tuning.segment_bytes = 64 << 10;
    config.fake_ranks_per_host = 2;
    AllReducer reducer(*g_world, config);
    std::vector<int32_t> data((3 << 20) + 5);  // 12 MiB: ~200 segments
    for (size_t i = 0; i < data.size(); ++i)
      data[i] = static_cast<int32_t>(i % 1000) * (g_world->rank() + 1);
    reducer.run(data, ReduceOp::sum);
    const int32_t ranks_sum = g_world->size() * (g_world->size() + 1) / 2;
    for (size_t i = 0; i < data.size(); ++i)
      ASSERT_EQ(data[i], static_cast<int32_t>(i % 1000) * ranks_sum)
          << algorithm_flag(a) << " at " << i;
  }
}

// Ranks that disagree on the algorithm get a MismatchError on every rank, not a hang.
TEST(AllReduceMpi, MismatchedAlgorithmsAreAnError) {
  ASSERT_GE(g_world->size(), 2) << "run under mpirun with two ranks or more";
  std::vector<float> grads(1000, 1.0f);
  EXPECT_THROW(
      {
        if (g_world->rank() == 0)
          ring_all_reduce(*g_world, grads, ReduceOp::sum, {.name = "grads"});
        else
          g_world->all_reduce(grads, ReduceOp::sum, {.name = "grads"});
      },
      MismatchError);
}

// A silent rank, with the mismatch check off so that the wait happens inside the ring's
// own transfers: the other rank gives up at the deadline although its large sends are
// still pending (abandoned, not waited for), and the group then refuses work. The silent
// rank afterwards drains what was sent to it, so that MPI finishes those sends. Ranks 0
// and 1 of any world play it in a group of their own; the others wait at the barrier.
TEST(AllReduceMpi, SilentRankTimesOutInsideTheRing) {
  ASSERT_GE(g_world->size(), 2) << "run under mpirun with two ranks or more";
  auto group = g_world->split(g_world->rank() < 2 ? 0 : -1, g_world->rank());
  if (!group) {
    g_world->barrier({.name = "after the timeout test"});
    return;
  }
  Settings settings = group->settings();
  settings.check_mismatch = false;
  group->set_settings(settings);
  AlgorithmOptions tuning;
  tuning.segment_bytes = 256 << 10;  // rank 0 sends chunk 0 (512 KiB) as 2 segments
  const auto timeout = std::chrono::milliseconds(300);
  std::vector<float> data(1 << 18, 1.0f);  // 1 MiB
  if (g_world->rank() == 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    std::vector<float> segment(1 << 16);
    for (int k = 0; k < 2; ++k) group->recv(segment, 0, tuning.tag);
  } else {
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THROW(ring_all_reduce(*group, data, ReduceOp::sum,
                                 {.name = "grads", .timeout = timeout}, tuning),
                 TimeoutError);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_GE(seconds, 0.29);
    EXPECT_LT(seconds, 1.2) << "pending sends must be abandoned, not waited for";
    EXPECT_THROW(ring_all_reduce(*group, data, ReduceOp::sum), Error);
  }
  g_world->barrier({.name = "after the timeout test"});
}

}  // namespace
}  // namespace flotilla::comm

int main(int argc, char** argv) {
  return flotilla::testing::run_mpi_tests(argc, argv, std::chrono::seconds(60), flotilla::comm::g_world);
}
