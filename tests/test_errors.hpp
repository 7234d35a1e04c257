// Shared by the unit tests: the message of the InputError a call raises, so that a test
// can check what the user is told.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "flotilla/base/error.hpp"

namespace flotilla::testing {

// The message of the InputError `f` raises; a failure of the test (and "") if it raises none.
template <class F>
std::string input_error_of(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no InputError raised";
  return "";
}

}  // namespace flotilla::testing
