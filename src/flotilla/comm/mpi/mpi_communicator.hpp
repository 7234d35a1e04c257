// The MPI backend (Debian's OpenMPI). mpi.h stays inside comm/mpi/*.cpp: nothing above
// comm sees MPI types.
#pragma once

#include <memory>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

// MPI_COMM_WORLD (duplicated) as a Communicator. Throws flotilla::Error when MPI is not
// initialised (main must create an MpiRuntime first).
std::unique_ptr<Communicator> make_mpi_world(const Settings& settings = {});

// True when `comm` is an MPI communicator (make_mpi_world or split from one).
bool is_mpi(const Communicator& comm);

// The MPI library's own blocking MPI_Allreduce, in place, on `comm`'s MPI communicator:
// the reference `flotilla bench comm` measures against. Unlike every other call here it
// has no mismatch check and no deadline (a benchmark's peer, never a training path).
// Throws flotilla::Error when `comm` is not an MPI communicator.
void mpi_reference_all_reduce(Communicator& comm, MutView data, ReduceOp op);

}  // namespace flotilla::comm
