// The all-to-all with variable counts (comm/algorithms/all_to_all_v.hpp) on the thread
// backend for worlds of 1 to 5 ranks (3 and 5: not powers of two) and on the local
// backend: random per-pair counts, zeros included, against a closed form; several calls in
// a row; the counts exchange; a wrong count is an error, not a truncation or a hang.
#include <gtest/gtest.h>

#include <mutex>
#include <vector>

#include "../test_seed.hpp"
#include "collective_spec.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/comm/algorithms/all_to_all_v.hpp"
#include "flotilla/comm/local/local_communicator.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "../bounded_settings.hpp"

namespace flotilla::comm {
namespace {

TEST(AllToAllV, MatchesClosedFormOnThreadWorldsOf1To5) {
  const uint64_t seed = testing::test_seed();
  for (int n = 1; n <= 5; ++n) {
    SCOPED_TRACE(n);
    run_threads(n, [&](Communicator& c) { spec::all_to_all_v_closed_form(c, seed); }, testing::bounded_settings());
  }
}

TEST(AllToAllV, RunsOnTheLocalBackend) {
  const uint64_t seed = testing::test_seed();
  auto c = make_local(testing::bounded_settings());
  spec::all_to_all_v_closed_form(*c, seed);
}

TEST(AllToAllV, CountsThatDoNotFitTheBuffersAreRefused) {
  auto c = make_local(testing::bounded_settings());
  std::vector<float> in(3), out(3);
  const std::vector<int64_t> four{4};
  EXPECT_THROW(all_to_all_v(*c, ConstView(std::span<const float>(in)), four, MutView(std::span<float>(out)), four),
               Error);
  const std::vector<int64_t> two_ranks{1, 2};
  EXPECT_THROW(exchange_counts(*c, two_ranks), Error);
}

// A receiver that expects fewer elements than the sender sends gets an error (the
// backend's exact-size receive), and no rank hangs.
TEST(AllToAllV, AReceiverExpectingAnotherSizeFails) {
  Settings s = testing::bounded_settings();
  s.timeout = std::chrono::seconds(1);
  int failures = 0;
  std::mutex m;
  try {
    run_threads(
        2,
        [&](Communicator& c) {
          std::vector<float> in(4, 1.0f), out(4);
          const std::vector<int64_t> send{2, 2};
          // Rank 1 expects 1 element from rank 0 (it sends 2) and makes up the rest from itself.
          const std::vector<int64_t> recv = c.rank() == 0 ? std::vector<int64_t>{2, 2} : std::vector<int64_t>{1, 2};
          try {
            all_to_all_v(c, ConstView(std::span<const float>(in)), send,
                         MutView(std::span<float>(out.data(), c.rank() == 0 ? 4 : 3)), recv);
          } catch (const Error&) {
            std::lock_guard<std::mutex> lock(m);
            ++failures;
          }
        },
        s);
  } catch (const Error&) {
    ++failures;
  }
  EXPECT_GE(failures, 1);
}

}  // namespace
}  // namespace flotilla::comm
