#include "flotilla/base/subprocess.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <utility>

#include "flotilla/base/error.hpp"

namespace flotilla {
namespace {
constexpr const char* kSubprocessComponent = "base/subprocess";
}  // namespace

Subprocess::Subprocess(const std::vector<std::string>& argv, bool capture_stdout, bool capture_stderr,
                       bool silence_stderr) {
  int out[2] = {-1, -1}, err[2] = {-1, -1};
  if ((capture_stdout && ::pipe2(out, O_CLOEXEC) != 0) || (capture_stderr && ::pipe2(err, O_CLOEXEC) != 0))
    throw Error(kSubprocessComponent, fmt::format("pipe: {}", std::strerror(errno)));
  pid_ = ::fork();
  if (pid_ < 0) throw Error(kSubprocessComponent, fmt::format("fork: {}", std::strerror(errno)));
  if (pid_ == 0) {
    ::setpgid(0, 0);
    if (capture_stdout) ::dup2(out[1], STDOUT_FILENO);
    if (capture_stderr) ::dup2(err[1], STDERR_FILENO);
    if (silence_stderr) {
      const int null = ::open("/dev/null", O_WRONLY);
      if (null >= 0) ::dup2(null, STDERR_FILENO);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "flotilla: error: [launch] cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid_, pid_);  // also here: no race with a signal sent right after fork
  if (capture_stdout) {
    ::close(out[1]);
    out_fd_ = out[0];
  }
  if (capture_stderr) {
    ::close(err[1]);
    err_fd_ = err[0];
  }
}

Subprocess::~Subprocess() {
  if (pid_ > 0 && !status_) {
    ::kill(-pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  if (out_fd_ >= 0) ::close(out_fd_);
  if (err_fd_ >= 0) ::close(err_fd_);
}

void Subprocess::close_out() { ::close(std::exchange(out_fd_, -1)); }
void Subprocess::close_err() { ::close(std::exchange(err_fd_, -1)); }
void Subprocess::signal(int sig) const { ::kill(pid_, sig); }
void Subprocess::signal_group(int sig) const { ::kill(-pid_, sig); }

std::optional<int> Subprocess::poll_exit() {
  if (status_) return status_;
  int st = 0;
  if (::waitpid(pid_, &st, WNOHANG) == pid_)
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 1;
  return status_;
}

int run_capture(const std::vector<std::string>& argv, double timeout_s, std::string* out, bool silence_stderr) {
  using Clock = std::chrono::steady_clock;
  Subprocess child(argv, /*capture_stdout=*/true, /*capture_stderr=*/false, silence_stderr);
  const Clock::time_point t0 = Clock::now();
  char buf[4096];
  while (child.out_fd() >= 0) {
    pollfd p{child.out_fd(), POLLIN, 0};
    const int left_ms = static_cast<int>((timeout_s - std::chrono::duration<double>(Clock::now() - t0).count()) * 1000);
    if (left_ms <= 0) break;
    if (::poll(&p, 1, std::min(left_ms, 200)) <= 0) continue;
    const ssize_t n = ::read(child.out_fd(), buf, sizeof buf);
    if (n <= 0) {
      child.close_out();
      break;
    }
    out->append(buf, static_cast<size_t>(n));
  }
  while (!child.poll_exit()) {
    if (std::chrono::duration<double>(Clock::now() - t0).count() > timeout_s) {
      child.signal_group(SIGKILL);
      while (!child.poll_exit()) ::usleep(10000);
      return 124;
    }
    ::usleep(10000);
  }
  return *child.poll_exit();
}

}  // namespace flotilla
