// Ctrl-C / SIGTERM under a StopSignals: the first is a request the training loop polls, a
// second ends the process at once with 128 + the signal; the old handlers come back after.
#include "flotilla/base/stop_signal.hpp"

#include <gtest/gtest.h>

#include <csignal>

#include "flotilla/base/error.hpp"

namespace flotilla {
namespace {

TEST(StopSignals, FirstSignalIsARequestNotADeath) {
  StopSignals guard;
  EXPECT_EQ(stop_signal_received(), 0);
  std::raise(SIGTERM);  // would end the test binary without the handler
  EXPECT_EQ(stop_signal_received(), SIGTERM);
  EXPECT_STREQ(stop_signal_name(stop_signal_received()), "SIGTERM");
}

TEST(StopSignals, ANewGuardClearsTheEarlierRequest) {
  {
    StopSignals guard;
    std::raise(SIGINT);
    EXPECT_EQ(stop_signal_received(), SIGINT);
  }
  StopSignals guard;
  EXPECT_EQ(stop_signal_received(), 0);
}

TEST(StopSignals, OnlyOneAtATime) {
  StopSignals guard;
  EXPECT_THROW(StopSignals second, Error);
}

TEST(StopSignalsDeathTest, SecondSignalQuitsAtOnceWith128PlusTheSignal) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        StopSignals guard;
        std::raise(SIGINT);
        std::raise(SIGINT);
      },
      ::testing::ExitedWithCode(128 + SIGINT), "second signal");
}

TEST(StopSignalsDeathTest, TheOldHandlersComeBackAfterwards) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        { StopSignals guard; }
        std::raise(SIGTERM);
      },
      ::testing::KilledBySignal(SIGTERM), "");
}

}  // namespace
}  // namespace flotilla
