#include "flotilla/parallel/expert_parallel.hpp"

#include <fmt/format.h>

#include <vector>

#include "flotilla/base/internal_error.hpp"
#include "flotilla/comm/algorithms/all_to_all_v.hpp"

namespace flotilla::parallel {

void ExpertParallel::exchange_counts(std::span<const int64_t> send, std::span<int64_t> recv) {
  // (ep, El) each way: chunk p of send is what goes to rank p.
  ep_.all_to_all(comm::ConstView(send), comm::MutView(recv), {.name = "expert counts"});
}

void ExpertParallel::exchange_rows(const float* send, std::span<const int64_t> send_rows, float* recv,
                                   std::span<const int64_t> recv_rows, int64_t C) {
  std::vector<int64_t> send_elems(send_rows.size()), recv_elems(recv_rows.size());
  int64_t send_total = 0, recv_total = 0;
  for (size_t p = 0; p < send_rows.size(); ++p) {
    send_elems[p] = send_rows[p] * C;
    send_total += send_elems[p];
    if (static_cast<int>(p) != ep_.rank()) bytes_sent_ += static_cast<uint64_t>(send_elems[p]) * sizeof(float);
  }
  for (size_t p = 0; p < recv_rows.size(); ++p) {
    recv_elems[p] = recv_rows[p] * C;
    recv_total += recv_elems[p];
  }
  comm::all_to_all_v(ep_, comm::ConstView(std::span<const float>(send, static_cast<size_t>(send_total))), send_elems,
                     comm::MutView(std::span<float>(recv, static_cast<size_t>(recv_total))), recv_elems,
                     {.name = "expert rows"});
  ++exchanges_;
}

void ExpertParallel::check_conserved(int64_t routed, int64_t received) {
  std::vector<int64_t> totals = {routed, received};
  ep_.all_reduce(comm::MutView(std::span<int64_t>(totals)), comm::ReduceOp::sum, {.name = "expert row count"});
  if (totals[0] != totals[1])
    throw InternalError("parallel/expert", fmt::format("rank {}: the expert-parallel group routed {} token rows to "
                                                       "experts but received {}: rows were lost or duplicated in "
                                                       "dispatch",
                                                       ep_.rank(), totals[0], totals[1]));
}

void ExpertParallel::sum_over_data(std::span<double> values) {
  if (data_.size() > 1)
    data_.all_reduce(comm::MutView(values), comm::ReduceOp::sum, {.name = "load balancing"});
}

}  // namespace flotilla::parallel
