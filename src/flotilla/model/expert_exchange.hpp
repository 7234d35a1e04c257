// Expert parallelism as the model sees it. model/ sits below comm/ and parallel/
// (DESIGN.md), so an MoE layer cannot call an all-to-all itself; it calls this interface,
// which parallel/expert_parallel.hpp implements over the mesh's ep and data groups.
//
// The ep ranks of a group hold the experts of every MoE layer in equal contiguous blocks:
// rank p holds experts [p * El, (p + 1) * El), El = E / ep. Each rank routes its own
// tokens; dispatch sorts their rows by expert, so the rows for rank p's experts are one
// contiguous run, and the exchange moves them (counts first, then rows); the expert rank
// runs its experts on what it received; combine sends the outputs back the same way, and
// backward reverses both (moe_parallel.cpp).
#pragma once

#include <cstdint>
#include <span>

namespace flotilla::model {

class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  // The expert-parallel group: its size (ep) and this rank's place in it.
  virtual int ep_size() const = 0;
  virtual int ep_rank() const = 0;
  // send (ep, El): the rows this rank routes to each rank's each local expert; recv (ep, El):
  // element (s, j) = what rank s sends this rank for its local expert j.
  virtual void exchange_counts(std::span<const int64_t> send, std::span<int64_t> recv) = 0;
  // Rows of C floats: send (sum send_rows, C), chunk p for rank p; recv (sum recv_rows, C),
  // chunk s from rank s.
  virtual void exchange_rows(const float* send, std::span<const int64_t> send_rows, float* recv,
                             std::span<const int64_t> recv_rows, int64_t C) = 0;
  // Tokens are conserved through a dispatch: summed over the ep group, the rows received
  // equal the assignments routed (N * K per rank). InternalError naming both otherwise.
  virtual void check_conserved(int64_t routed, int64_t received) = 0;
  // values summed in place over every rank that trains on its own tokens (dp x ep): the
  // load-balancing loss's statistics, so that it is the formula over the whole batch.
  virtual void sum_over_data(std::span<double> values) = 0;
};

}  // namespace flotilla::model
