#include "flotilla/base/error.hpp"

#include <cerrno>
#include <cstring>

namespace flotilla {

std::string Error::format_message(std::string_view component, std::string_view what) {
  std::string message;
  message.reserve(component.size() + what.size() + 3);
  message.append("[").append(component).append("] ").append(what);
  return message;
}

void throw_errno(std::string_view component, std::string_view what) {
  const int err = errno;
  throw Error(component, std::string(what) + ": " + std::strerror(err));
}

}  // namespace flotilla
