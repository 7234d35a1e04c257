// What one rank sends over the network in a ring implementation of each collective: the one
// place these formulas live. Byte counters (codecs, gradient sync, local SGD), the planner's
// cost model, doctor's bus bandwidth and the all-reduce benchmark all ask here.
//
// With N ranks and a buffer of b bytes:
//   all_reduce       b on every rank          2(N-1)/N b sent, in 2(N-1) steps
//                    (a reduce-scatter followed by an all-gather)
//   reduce_scatter   b on every rank in,      (N-1)/N b sent, in N-1 steps
//                    b/N out
//   all_gather       b/N in, b out            (N-1)/N b sent, in N-1 steps
//   all_to_all       b in total               (N-1)/N b sent
// One rank sends nothing.
#pragma once

#include <cstdint>

namespace flotilla::comm {

// The share of the whole buffer one rank sends: 2(N-1)/N for an all-reduce; (N-1)/N for a
// reduce-scatter, an all-gather (of the gathered size) or an all-to-all.
constexpr double all_reduce_wire_fraction(int world) { return world > 1 ? 2.0 * (world - 1) / world : 0.0; }
constexpr double scatter_gather_wire_fraction(int world) { return world > 1 ? double(world - 1) / world : 0.0; }
// Latency-bound steps of the ring: 2(N-1) for an all-reduce, N-1 for the others.
constexpr int all_reduce_ring_steps(int world) { return world > 1 ? 2 * (world - 1) : 0; }
constexpr int scatter_gather_ring_steps(int world) { return world > 1 ? world - 1 : 0; }

// The same in whole bytes, for counters (exact integer arithmetic, rounded down).
constexpr int64_t ring_all_reduce_bytes(int64_t bytes, int world) {
  return world > 1 ? 2 * (world - 1) * bytes / world : 0;
}
constexpr int64_t ring_reduce_scatter_bytes(int64_t total_bytes, int world) {
  return world > 1 ? (world - 1) * total_bytes / world : 0;
}
// `bytes_per_rank`: what each rank contributes (the gathered buffer is N times that).
constexpr int64_t ring_all_gather_bytes(int64_t bytes_per_rank, int world) {
  return world > 1 ? (world - 1) * bytes_per_rank : 0;
}
constexpr int64_t ring_all_to_all_bytes(int64_t total_bytes, int world) {
  return ring_reduce_scatter_bytes(total_bytes, world);
}

}  // namespace flotilla::comm
