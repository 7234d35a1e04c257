#include "flotilla/comm/mpi/mpi_runtime.hpp"

#include <cstdlib>

#include "flotilla/base/log.hpp"
#include "flotilla/comm/mpi/mpi_util.hpp"
#include "flotilla/comm/world.hpp"

namespace flotilla::comm {
namespace {

MpiRuntime::Threading from_mpi(int level) {
  switch (level) {
    case MPI_THREAD_MULTIPLE: return MpiRuntime::Threading::multiple;
    case MPI_THREAD_SERIALIZED: return MpiRuntime::Threading::serialized;
    case MPI_THREAD_FUNNELED: return MpiRuntime::Threading::funneled;
    default: return MpiRuntime::Threading::single;
  }
}

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = MPI_THREAD_SINGLE;
  if (initialized) {
    mpi::check(MPI_Query_thread(&provided), "MPI_Query_thread", -1);
  } else {
    const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    if (rc != MPI_SUCCESS)
      throw Error("comm/mpi", "MPI_Init_thread failed: " + mpi::error_string(rc));
    owns_ = true;
  }
  threading_ = from_mpi(provided);
  // Errors come back as codes that flotilla turns into exceptions (the default handler
  // would abort the job from inside MPI, with no say for main).
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  if (threading_ < Threading::serialized) {
    if (owns_) MPI_Finalize();
    owns_ = false;
    throw Error("comm/mpi", fmt::format("MPI grants only {}; flotilla needs at least "
                                        "MPI_THREAD_SERIALIZED",
                                        threading_name(threading_)));
  }
  log::debug("comm/mpi: MPI initialised with {}", threading_name(threading_));
}

MpiRuntime::~MpiRuntime() {
  if (owns_ && !mpi::finalized()) MPI_Finalize();
}

std::unique_ptr<MpiRuntime> MpiRuntime::start_if_launched(int* argc, char*** argv) {
  if (!launched_under_mpi()) return nullptr;
  return std::make_unique<MpiRuntime>(argc, argv);
}

std::string_view MpiRuntime::threading_name(Threading t) {
  switch (t) {
    case Threading::single: return "MPI_THREAD_SINGLE";
    case Threading::funneled: return "MPI_THREAD_FUNNELED";
    case Threading::serialized: return "MPI_THREAD_SERIALIZED";
    case Threading::multiple: return "MPI_THREAD_MULTIPLE";
  }
  return "?";
}

void MpiRuntime::abort(int exit_code) {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::abort();  // MPI_Abort does not return; if it did, the job must still stop
}

}  // namespace flotilla::comm
