// The clipping norm's squared sum over a sharded gradient, written once for ZeRO-2's units
// (parallel/zero.cpp) and ZeRO-3's groups (parallel/zero3.cpp).
#pragma once

#include <array>
#include <cstdint>
#include <span>

#include "flotilla/comm/communicator.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/parallel/gradient_sync.hpp"

namespace flotilla::parallel {

// `cuts`: ChunkCuts (chunk_cut.hpp) with the places of this rank's chunk and of the tail in
// `shard` (chunk_slot, tail_slot). The chunks' squared sums add over the dp ranks; the tails
// are the same on every rank. Under tensor parallelism (`tp` not null) the arena is this tp
// rank's local model: the squares of its slices of split tensors (`tp_split`, ascending)
// add over the tp group too, the replicated ones' (norms) count once.
template <class Cuts>
double sharded_grad_sum_squares(const Cuts& cuts, int64_t rank, const float* shard, std::span<const ArenaRange> tp_split,
                                comm::Communicator& dp, model::TensorParallelGroup* tp) {
  std::array<double, 2> chunks = {0.0, 0.0};  // replicated over tp, split over tp
  model::SquareSums tails;
  for (const auto& cut : cuts) {
    const model::ElementRange c = cut.chunk_of(rank), t = cut.tail();
    const model::SquareSums cs = model::square_sums(shard + cut.chunk_slot, c.begin, c.end, tp_split);
    const model::SquareSums ts = model::square_sums(shard + cut.tail_slot, t.begin, t.end, tp_split);
    chunks[0] += cs.replicated;
    chunks[1] += cs.split;
    tails.replicated += ts.replicated;
    tails.split += ts.split;
  }
  dp.all_reduce(chunks, comm::ReduceOp::sum, comm::Options{.name = "gradient norm"});
  std::array<double, 1> split = {chunks[1] + tails.split};
  if (tp) tp->all_reduce_sum(split, "tp gradient norm");
  return chunks[0] + tails.replicated + split[0];
}

}  // namespace flotilla::parallel
