// ZeRO stages 1 and 2 (Rajbhandari et al. 2020, DeepSpeed's ZeRO; PyTorch's
// ZeroRedundancyOptimizer): each rank keeps AdamW's moments for only its shard of the flat
// trainable arena, and stage 2 its gradients too.
//
// Shards are ranges of the flat arena. The arena is cut into units (the fusion buckets of
// comm/fusion.hpp, contiguous runs of layers of about --bucket-mb, or the whole arena with
// --bucket-mb 0); a unit [b, e) of n floats with c = floor(n / N) gives rank r the chunk
// [b + r c, b + (r+1) c); its tail [b + N c, e) (fewer than N floats) is every rank's,
// all-reduced and updated identically everywhere, so no size needs to divide by N.
// A rank's shard is its chunks and the tails, kept one after the other in a shard buffer.
//
// A step: as backward finishes a unit, the communication thread reduce-scatters it into the
// rank's chunk (plain data parallelism's overlap, with a reduce-scatter for the
// all-reduce); each rank clips by the global norm (the chunks' squared sums added over the
// ranks) and updates its shard with its moments; the units are then all-gathered in place.
// Bytes per step: a reduce-scatter and an all-gather, (N-1)/N 4P each = one all-reduce's.
// Stage 1 reduces after the last micro-batch of an accumulation window, as plain data
// parallelism does. Stage 2 reduces after every micro-batch, adds into the shard, and hands
// each unit's part of the gradient arena back to the operating system as soon as it is
// reduced (base/memory.hpp release_zeroed): the whole gradient never exists at once, only
// the units backward has written and the communication thread not yet reduced - at most
// two finished ones (backward waits when it outruns the network) and the one being written.
//
// The update is elementwise, so the result equals the unsharded update on the same summed
// gradient; the sums themselves come from a reduce-scatter instead of an all-reduce, which
// may add in another order (float rounding: the equivalence test's 1e-5).
//
// With --compression fp16 or bf16 the units' chunks travel in halves (comm/compression's
// WireSum: each rank's values rounded once, summed in float32): half the reduce-scatter's
// bytes. There is no error feedback, as in PyTorch's fp16 compression hook: keeping what
// rounding lost would take a whole gradient's memory on every rank, which stage 2 exists
// to avoid. The tails and the weights' all-gather stay float32.
#pragma once

#include <memory>

#include "flotilla/parallel/gradient_sync.hpp"

namespace flotilla::parallel {

// `bucket_mb` > 0 (and N > 1): the arena is cut into fusion buckets (comm/fusion.hpp),
// each sharded on its own and reduce-scattered on the communication thread while backward
// goes on; 0: one unit, reduced after backward.
std::unique_ptr<GradientSync> make_zero_sync(model::Llama& model, DataParallel& dp, int stage, double bucket_mb,
                                             TraceRecorder* trace);

// Stage 1 over given ranges of the arena only (ascending, disjoint), each one unit reduced
// at the exchange: a pipeline stage's own tensors (parallel/pipeline_sync.hpp), sharded over
// the stage's dp group. Its exchange sums the loss it is given over `dp`.
std::unique_ptr<GradientSync> make_zero_sync_over(model::Llama& model, DataParallel& dp,
                                                  std::span<const ArenaRange> ranges);

}  // namespace flotilla::parallel
