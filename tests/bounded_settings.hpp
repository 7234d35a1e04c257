// Shared by the unit tests that run thread worlds: communicator settings whose collectives
// give up after a bound, so that a bug fails the test instead of hanging it (several
// threads share two cores: the bound is generous).
#pragma once

#include <chrono>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::testing {

inline comm::Settings bounded_settings(int timeout_s = 30) {
  comm::Settings s;
  s.timeout = std::chrono::seconds(timeout_s);
  return s;
}

}  // namespace flotilla::testing
