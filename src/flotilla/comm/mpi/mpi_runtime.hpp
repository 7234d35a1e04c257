// MPI's lifetime as a value owned by main: MPI_Init_thread in the constructor,
// MPI_Finalize in the destructor. Create it before make_world() and let every
// communicator die before it does.
#pragma once

#include <memory>
#include <string_view>

namespace flotilla::comm {

class MpiRuntime {
 public:
  // The thread support MPI granted (MPI_THREAD_*). flotilla asks for `multiple` (a
  // communication thread beside compute threads) and works with `serialized` (one thread
  // at a time calls MPI, which holds as long as one thread uses each communicator).
  enum class Threading { single, funneled, serialized, multiple };

  // Initialises MPI unless something else already did (then it neither initialises nor
  // finalises). Throws flotilla::Error when MPI grants less than `serialized`.
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // An MpiRuntime when this process was launched as one rank of an MPI job
  // (launched_under_mpi()), else nullptr: a lone process never touches MPI.
  static std::unique_ptr<MpiRuntime> start_if_launched(int* argc, char*** argv);

  Threading threading() const { return threading_; }
  static std::string_view threading_name(Threading t);  // "MPI_THREAD_MULTIPLE", ...

  // MPI_Abort on MPI_COMM_WORLD: for main, after a TimeoutError, since a peer may still
  // write into the buffers of an abandoned collective. Library code never calls it.
  [[noreturn]] static void abort(int exit_code);

 private:
  Threading threading_ = Threading::single;
  bool owns_ = false;
};

}  // namespace flotilla::comm
