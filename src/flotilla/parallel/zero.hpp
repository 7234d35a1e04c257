// ZeRO stages 1 and 2 (Rajbhandari et al. 2020, DeepSpeed's ZeRO; PyTorch's
// ZeroRedundancyOptimizer): each rank keeps AdamW's moments for only its shard of the flat
// trainable arena, and stage 2 its gradients too.
//
// Shards are ranges of the flat arena of P floats: with N ranks and c = floor(P / N), rank
// r owns [r c, (r+1) c); the tail [N c, P) (fewer than N floats) is owned by every rank
// alike, all-reduced and updated identically everywhere, so no size needs to divide by N.
//
// A step: backward fills the whole gradient arena as in plain data parallelism; the
// exchange reduce-scatters [0, N c) into a shard buffer of c floats (plus the all-reduced
// tail); each rank clips (by the global norm: the shards' squared sums added over the
// ranks) and updates its shard of the weights with its moments; the weights are then
// all-gathered in place. Bytes per step: a reduce-scatter and an all-gather, (N-1)/N 4P each
// = one all-reduce's. Stage 2 then hands the gradient arena's pages back to the operating
// system until the next backward writes them (base/memory.hpp release_zeroed), so between
// steps a rank holds 4P/N of gradients; during backward the arena is whole (the gradients
// are reduce-scattered after backward, not bucket by bucket during it).
//
// The update is elementwise, so the result equals the unsharded update on the same summed
// gradient; the sums themselves come from a reduce-scatter instead of an all-reduce, which
// may add in another order (float rounding: the equivalence test's 1e-5).
#pragma once

#include <memory>

#include "flotilla/parallel/gradient_sync.hpp"

namespace flotilla::parallel {

std::unique_ptr<GradientSync> make_zero_sync(model::Llama& model, DataParallel& dp, int stage);

}  // namespace flotilla::parallel
