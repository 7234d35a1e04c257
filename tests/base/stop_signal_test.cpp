// Ctrl-C / SIGTERM under a StopSignals: the first is a request the training loop polls, a
// second ends the process at once with 128 + the signal; the old handlers come back after.
#include "flotilla/base/stop_signal.hpp"

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <string>
#include <thread>

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

// mpirun passes SIGUSR1 on to every rank at once; `flotilla launch` stops a job with it.
TEST(StopSignals, SigUsr1IsARequestToo) {
  StopSignals guard;
  std::raise(SIGUSR1);  // its default action ends the process
  EXPECT_EQ(stop_signal_received(), SIGUSR1);
  EXPECT_STREQ(stop_signal_name(stop_signal_received()), "SIGUSR1");
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

// mpirun answers Ctrl-C by sending SIGTERM to its ranks and reading their output no more.
// A child whose stdout and stderr are a pipe nobody reads gets SIGTERM from its parent (this
// test, standing for mpirun) and then writes 1 MiB, far past the pipe's capacity: with
// ParentOutput::stops_reading_on_signal that goes to /dev/null and the child ends; without
// it the child would block in write() until killed, as ranks did before their checkpoint.
TEST(StopSignals, ASignalFromTheLauncherSendsOutputToDevNull) {
  int output[2], ready[2];
  ASSERT_EQ(::pipe(output), 0);
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::dup2(output[1], STDOUT_FILENO);
    ::dup2(output[1], STDERR_FILENO);
    ::close(output[0]);
    ::close(output[1]);
    StopSignals guard(ParentOutput::stops_reading_on_signal);
    if (::write(ready[1], "r", 1) != 1) ::_exit(4);
    while (stop_signal_received() == 0) ::usleep(1000);
    const std::string chunk(1 << 16, 'x');
    for (int i = 0; i < 16; ++i)
      if (::write(STDOUT_FILENO, chunk.data(), chunk.size()) != static_cast<ssize_t>(chunk.size())) ::_exit(3);
    ::_exit(stop_signal_received() == SIGTERM ? 0 : 2);
  }
  ::close(output[1]);  // the read end stays open, never read: a full pipe blocks the writer
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  ASSERT_EQ(::kill(child, SIGTERM), 0);
  int status = 0;
  pid_t done = 0;
  for (int waited_ms = 0; waited_ms < 10000 && done == 0; waited_ms += 10) {
    done = ::waitpid(child, &status, WNOHANG);
    if (done == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (done == 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
    ::close(output[0]);
    FAIL() << "the child blocked writing into the pipe nobody reads";
  }
  ::close(output[0]);
  ::close(ready[0]);
  ::close(ready[1]);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace flotilla
