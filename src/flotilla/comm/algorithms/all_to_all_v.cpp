#include "flotilla/comm/algorithms/all_to_all_v.hpp"

#include <cstring>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/algorithms/payload.hpp"

namespace flotilla::comm {
namespace {

constexpr std::string_view kAllToAllVComponent = "comm/all_to_all_v";

// Element offsets of the chunks: (size + 1), the last one the total.
std::vector<size_t> chunk_offsets(const Communicator& comm, std::span<const int64_t> counts, std::string_view what) {
  if (counts.size() != static_cast<size_t>(comm.size()))
    throw Error(kAllToAllVComponent, fmt::format("rank {}: {} has {} entries for a group of {} ranks", comm.rank(), what,
                                        counts.size(), comm.size()));
  std::vector<size_t> offsets(counts.size() + 1, 0);
  for (size_t r = 0; r < counts.size(); ++r) {
    if (counts[r] < 0)
      throw Error(kAllToAllVComponent, fmt::format("rank {}: {}[{}] = {} is negative", comm.rank(), what, r, counts[r]));
    offsets[r + 1] = offsets[r] + static_cast<size_t>(counts[r]);
  }
  return offsets;
}

}  // namespace

std::vector<int64_t> exchange_counts(Communicator& comm, std::span<const int64_t> send_counts,
                                     const Options& options) {
  if (send_counts.size() != static_cast<size_t>(comm.size()))
    throw Error(kAllToAllVComponent, fmt::format("rank {}: {} send counts for a group of {} ranks", comm.rank(),
                                        send_counts.size(), comm.size()));
  std::vector<int64_t> recv_counts(send_counts.size());
  comm.all_to_all(ConstView(send_counts), MutView(std::span<int64_t>(recv_counts)), options);
  return recv_counts;
}

void all_to_all_v(Communicator& comm, ConstView in, std::span<const int64_t> send_counts, MutView out,
                  std::span<const int64_t> recv_counts, const Options& options, int tag) {
  const std::vector<size_t> send_at = chunk_offsets(comm, send_counts, "send_counts");
  const std::vector<size_t> recv_at = chunk_offsets(comm, recv_counts, "recv_counts");
  if (send_at.back() != in.count() || recv_at.back() != out.count() || in.type() != out.type())
    throw Error(kAllToAllVComponent, fmt::format("rank {}: in holds {} x {} and out {} x {}, but the counts add up to {} "
                                        "and {} (of one type)",
                                        comm.rank(), in.count(), element_name(in.type()), out.count(),
                                        element_name(out.type()), send_at.back(), recv_at.back()));
  const size_t bytes = element_size(in.type());
  const int me = comm.rank(), n = comm.size();
  if (send_counts[static_cast<size_t>(me)] != recv_counts[static_cast<size_t>(me)])
    throw Error(kAllToAllVComponent, fmt::format("rank {}: sends itself {} elements but expects {}", me,
                                        send_counts[static_cast<size_t>(me)], recv_counts[static_cast<size_t>(me)]));
  // Signed with the group's size: the counts themselves differ from rank to rank.
  comm.run_p2p_collective(
      CollectiveKind::all_to_all, "all_to_all_v", options, static_cast<uint64_t>(n), in.type(), ReduceOp::sum,
      [&](Clock::time_point deadline) {
        std::vector<Request> requests;
        requests.reserve(2 * static_cast<size_t>(n));
        try {
          // Receives first, then sends, in rank order starting after our own: every pair
          // has both of its messages posted without waiting on a third rank.
          for (int step = 1; step < n; ++step) {
            const int from = (me - step + n) % n;
            const auto f = static_cast<size_t>(from);
            if (recv_counts[f] == 0) continue;
            requests.push_back(comm.irecv(
                MutView(std::span<std::byte>(out.data() + recv_at[f] * bytes, static_cast<size_t>(recv_counts[f]) * bytes),
                        out.type(), static_cast<size_t>(recv_counts[f])),
                from, tag));
          }
          for (int step = 1; step < n; ++step) {
            const int to = (me + step) % n;
            const auto t = static_cast<size_t>(to);
            if (send_counts[t] == 0) continue;
            requests.push_back(comm.isend(
                ConstView(std::span<const std::byte>(in.data() + send_at[t] * bytes,
                                                     static_cast<size_t>(send_counts[t]) * bytes),
                          in.type(), static_cast<size_t>(send_counts[t])),
                to, tag));
          }
        } catch (...) {
          detail::abandon_all(requests);
          throw;
        }
        const auto m = static_cast<size_t>(me);
        if (send_counts[m] > 0)
          std::memcpy(out.data() + recv_at[m] * bytes, in.data() + send_at[m] * bytes,
                      static_cast<size_t>(send_counts[m]) * bytes);
        detail::wait_all_until(requests, deadline);
      });
}

}  // namespace flotilla::comm
