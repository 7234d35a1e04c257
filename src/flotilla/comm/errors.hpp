// The two failures a distributed job must tell apart from a plain Error: the CLI aborts
// the job (MPI_Abort) after a TimeoutError, because a peer may still write into buffers
// of an abandoned operation; after a MismatchError every rank has thrown at the same
// collective and the communicator is still usable.
#pragma once

#include "flotilla/base/error.hpp"

namespace flotilla::comm {

class TimeoutError : public Error {
 public:
  using Error::Error;
};

class MismatchError : public Error {
 public:
  using Error::Error;
};

}  // namespace flotilla::comm
