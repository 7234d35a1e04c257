// The gradient sync of a pipeline stage (parallel/pipeline.hpp), composed with data
// parallelism over the mesh's dp group. A stage *owns* the trainable tensors of its
// layers (stage 0 also the embedding, the last stage the head): its optimizer updates
// only those, from their gradients concatenated in arena order. A step's exchange:
//   1. the loss: only the last stage has one; summed over the pp group, every stage then
//      knows the replica's (loss sum, target tokens) for logging and for the divisor;
//   2. tied embeddings: the last stage's lm_head share of the embedding gradient goes to
//      stage 0, which adds it to its own (and after the update sends the weights back);
//   3. data parallel: the owned gradients all-reduced over the dp group (the ranks of the
//      same stage in the other replicas), which also sums the loss over the replicas.
// The gradient norm is the global one: each stage's sum of squares, summed over the pp
// group. Each float of the arena belongs to one stage, so nothing is counted twice.
// With --zero 1, step 3 is ZeRO-1's over the stage's own ranges instead (parallel/zero.hpp):
// reduce-scattered over the dp group, each rank updating its shard, the shards all-gathered.
#pragma once

#include <memory>
#include <vector>

#include "flotilla/parallel/gradient_sync.hpp"
#include "flotilla/parallel/pipeline.hpp"

namespace flotilla::parallel {

// The ranges of the trainable arena each stage owns (indexed by stage): ascending,
// disjoint, adjacent ones merged; every trainable float in exactly one stage's.
std::vector<std::vector<ArenaRange>> stage_owned_ranges(const model::Llama& model, const model::ParamTable& table,
                                                        std::span<const StageRange> stages);

// `pipeline` and `dp` (null: one replica) must outlive the sync; the model's layer range
// is set to the stage's. `zero_stage` 1: the stage's ranges sharded over `dp` (ZeRO-1:
// reduce-scattered, the moments of the rank's shard only, the update all-gathered); the
// clipping norm then sums the dp group's shards, then the stages. InputError for stage 2
// or 3.
std::unique_ptr<GradientSync> make_pipeline_sync(model::Llama& model, PipelineStage& pipeline, DataParallel* dp,
                                                 int zero_stage = 0);
// Whether `sync` is a pipeline stage's whose ranges are sharded over its dp group (ZeRO-1):
// each replica then writes its own part of a checkpoint (sole_owned()), not the first alone.
bool pipeline_zero_sharded(const GradientSync& sync);

}  // namespace flotilla::parallel
