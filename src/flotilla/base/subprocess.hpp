// Child processes for flotilla launch: fork/exec in a process group of their own (so a
// job and everything it started can be signalled at once), stdout and stderr read through
// pipes or left as the parent's.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace flotilla {

class Subprocess {
 public:
  // Starts argv[0] (searched in PATH) with argv. `capture_*`: the stream is a pipe read
  // through out_fd() / err_fd(); `silence_stderr`: stderr goes to /dev/null. Error when the
  // process cannot be started; a program that cannot be executed exits 127 with a line.
  Subprocess(const std::vector<std::string>& argv, bool capture_stdout, bool capture_stderr,
             bool silence_stderr = false);
  // A process still running is killed (its whole group) and reaped.
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  int out_fd() const { return out_fd_; }  // -1 when not captured or closed
  int err_fd() const { return err_fd_; }
  void close_out();
  void close_err();
  // To the process alone (mpirun passes SIGTERM on to its ranks once), or to its group
  // (everything it started on this machine).
  void signal(int sig) const;
  void signal_group(int sig) const;
  // The exit status as a shell reports it (128 + the signal when killed) once the process
  // has ended; nullopt while it runs. Never blocks.
  std::optional<int> poll_exit();

 private:
  int pid_ = -1;
  int out_fd_ = -1, err_fd_ = -1;
  std::optional<int> status_;
};

// Runs argv to its end, killed (status 124) after `timeout_s`: its exit status, its stdout
// appended to `out`. Its stderr is the caller's, or silenced.
int run_capture(const std::vector<std::string>& argv, double timeout_s, std::string* out, bool silence_stderr);

}  // namespace flotilla
