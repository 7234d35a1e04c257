#include "flotilla/base/error.hpp"

#include <cerrno>
#include <cstring>

namespace flotilla {

void throw_errno(std::string_view component, std::string_view what) {
  const int err = errno;
  throw Error(component, std::string(what) + ": " + std::strerror(err));
}

}  // namespace flotilla
