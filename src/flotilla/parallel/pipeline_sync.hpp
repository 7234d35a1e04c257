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
// is set to the stage's.
std::unique_ptr<GradientSync> make_pipeline_sync(model::Llama& model, PipelineStage& pipeline, DataParallel* dp);

}  // namespace flotilla::parallel
