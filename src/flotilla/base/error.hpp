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

// errno-carrying system call failure.
[[noreturn]] void throw_errno(std::string_view component, std::string_view what);

}  // namespace flotilla
