// The all-to-all with variable counts (MPI_Alltoallv), built out of send and receive so
// that every backend (local, thread, mpi) has it. Vocabulary: each rank cuts its `in` into
// one *chunk* per destination rank, chunk r holding send_counts[r] elements; it receives
// one chunk from every rank into `out`, chunk r (from rank r) holding recv_counts[r].
// Counts differ from rank to rank and call to call (expert parallelism's dispatch: how
// many token rows go to each expert's rank), so a caller first exchanges them with
// exchange_counts, then moves the data.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "flotilla/comm/communicator.hpp"

namespace flotilla::comm {

// recv_counts (size): element r = rank r's send_counts[rank]. One all_to_all of int64.
std::vector<int64_t> exchange_counts(Communicator& comm, std::span<const int64_t> send_counts,
                                     const Options& options = {});

// in: (sum send_counts) elements, chunks in rank order; out: (sum recv_counts) elements,
// chunks in rank order. Every rank calls it alike (same type); recv_counts[r] must be what
// rank r sends here (exchange_counts). Signed and checked like any collective
// ("all_to_all_v:<name>"); a chunk whose size differs from the count the receiver expects
// is an Error from the backend, never a silent truncation. `in` and `out` must not overlap.
// `tag` is the tag of its messages (p2p users of the same communicator pick others).
void all_to_all_v(Communicator& comm, ConstView in, std::span<const int64_t> send_counts, MutView out,
                  std::span<const int64_t> recv_counts, const Options& options = {},
                  int tag = Communicator::kMaxTag);

}  // namespace flotilla::comm
