// Shared by the MPI translation units only: includes mpi.h.
#pragma once

// The C API only: OpenMPI's deprecated C++ bindings add nothing and warn.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <string>
#include <string_view>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla::comm::mpi {

inline std::string error_string(int rc) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) return fmt::format("MPI error {}", rc);
  return std::string(text, static_cast<size_t>(length));
}

// "[comm/mpi] rank 2: MPI_Allreduce failed: <MPI_Error_string>"
inline void check(int rc, std::string_view call, int rank) {
  if (rc != MPI_SUCCESS)
    throw Error("comm/mpi", fmt::format("rank {}: {} failed: {}", rank, call, error_string(rc)));
}

inline bool finalized() {
  int done = 0;
  MPI_Finalized(&done);
  return done != 0;
}

}  // namespace flotilla::comm::mpi
