// flotilla broke one of its own invariants (not the user's input, not the system): a bug to
// report, e.g. token rows lost between expert-parallel ranks. Exit code 1 at the CLI, as
// any Error.
#pragma once

#include "flotilla/base/error.hpp"

namespace flotilla {

class InternalError : public Error {
 public:
  using Error::Error;
};

}  // namespace flotilla
