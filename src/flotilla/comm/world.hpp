// The communicator a process starts with.
#pragma once

#include <cstdlib>
#include <functional>
#include <memory>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

using EnvLookup = std::function<const char*(const char*)>;

// Whether a launcher started this process as one rank of an MPI job: mpirun/mpiexec
// (OpenMPI's OMPI_COMM_WORLD_SIZE; PMI_SIZE or PMIX_RANK from MPICH's hydra and PMIx
// launchers) or srun with more than one task (SLURM_PROCID and SLURM_NTASKS > 1).
// `getenv` is injectable for tests.
bool launched_under_mpi(const EnvLookup& getenv = [](const char* name) {
  return std::getenv(name);
});

// MPI's world when launched_under_mpi() (an MpiRuntime must be alive: see
// mpi/mpi_runtime.hpp), else the size-1 local group.
std::unique_ptr<Communicator> make_world(const Settings& settings = {});

}  // namespace flotilla::comm
