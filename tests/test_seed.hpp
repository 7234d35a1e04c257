// Shared by the unit tests: a fresh random seed per test, printed (and recorded in the
// XML report) so that a failure replays with FLOTILLA_TEST_SEED=<seed>.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

namespace flotilla::testing {

inline uint64_t test_seed() {
  uint64_t seed;
  if (const char* env = std::getenv("FLOTILLA_TEST_SEED")) {
    seed = std::strtoull(env, nullptr, 10);
  } else {
    std::random_device rd;
    seed = (static_cast<uint64_t>(rd()) << 32) | rd();
  }
  std::printf("[   seed   ] %llu (replay: FLOTILLA_TEST_SEED=%llu)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

}  // namespace flotilla::testing
