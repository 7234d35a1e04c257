// The MPI backend (Debian's OpenMPI). mpi.h stays inside comm/mpi/*.cpp: nothing above
// comm sees MPI types.
#pragma once

#include <memory>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

// MPI_COMM_WORLD (duplicated) as a Communicator. Throws flotilla::Error when MPI is not
// initialised (main must create an MpiRuntime first).
std::unique_ptr<Communicator> make_mpi_world(const Settings& settings = {});

}  // namespace flotilla::comm
