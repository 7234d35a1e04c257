// Expert parallelism over the mesh (--parallel ep=E): the model's ExpertExchange
// (model/expert_exchange.hpp) on the mesh's ep group, whose ranks hold a block of every
// MoE layer's experts each and exchange token rows with all_to_all_v (counts first), and
// its data group (dp x ep), over which the load-balancing loss's statistics are summed.
// It counts what it moves, for the metrics and the benchmark.
#pragma once

#include <cstdint>
#include <span>

#include "flotilla/comm/communicator.hpp"
#include "flotilla/model/expert_exchange.hpp"

namespace flotilla::parallel {

class ExpertParallel final : public model::ExpertExchange {
 public:
  // `ep` and `data` (and `replicas`) must outlive this; every rank of `data` makes one
  // alike. `replicas`: the mesh's dp group, the ranks holding the same block of experts
  // (null: this rank alone), over which those experts' gradients are summed
  // (parallel/expert_sync.hpp).
  ExpertParallel(comm::Communicator& ep, comm::Communicator& data, comm::Communicator* replicas = nullptr)
      : ep_(ep), data_(data), replicas_(replicas) {}

  int ep_size() const override { return ep_.size(); }
  int ep_rank() const override { return ep_.rank(); }
  void exchange_counts(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void exchange_rows(const float* send, std::span<const int64_t> send_rows, float* recv,
                     std::span<const int64_t> recv_rows, int64_t C) override;
  void check_conserved(int64_t routed, int64_t received) override;
  void sum_over_data(std::span<double> values) override;

  comm::Communicator& ep_group() { return ep_; }
  comm::Communicator& data_group() { return data_; }
  comm::Communicator* replica_group() { return replicas_; }

  // Bytes this rank sent to other ranks in row exchanges (its own rows stay put), and the
  // row exchanges run, since construction.
  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t exchanges() const { return exchanges_; }

 private:
  comm::Communicator& ep_;
  comm::Communicator& data_;
  comm::Communicator* replicas_;
  uint64_t bytes_sent_ = 0;
  uint64_t exchanges_ = 0;
};

}  // namespace flotilla::parallel
