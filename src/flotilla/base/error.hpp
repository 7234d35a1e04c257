// Errors: one exception family. The message starts with the component in brackets,
// e.g. "[io/safetensors] model.safetensors: header length 99999999 exceeds file size",
// so the CLI can print it as one line and exit non-zero.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace flotilla {

class Error : public std::runtime_error {
 public:
  Error(std::string_view component, std::string_view what)
      : std::runtime_error(format_message(component, what)), component_(component) {}
  const std::string& component() const noexcept { return component_; }

 private:
  static std::string format_message(std::string_view component, std::string_view what);
  std::string component_;
};

// Input a user brought is wrong (file, config, flag): exit code 2 at the CLI.
class InputError : public Error {
 public:
  using Error::Error;
};

// A run that ended early on purpose, at the same step on every rank (the ranks agreed on
// it through a collective): a divergence (exit 1), or a stop signal (128 + the signal).
// main prints the line (unless `quiet`: ranks other than 0 leave it to rank 0) and returns
// `exit_code` without aborting an MPI job.
class RunStopped : public Error {
 public:
  RunStopped(std::string_view component, std::string_view what, int exit_code, bool quiet = false)
      : Error(component, what), exit_code_(exit_code), quiet_(quiet) {}
  int exit_code() const noexcept { return exit_code_; }
  bool quiet() const noexcept { return quiet_; }

 private:
  int exit_code_;
  bool quiet_;
};

// errno-carrying system call failure.
[[noreturn]] void throw_errno(std::string_view component, std::string_view what);

}  // namespace flotilla
