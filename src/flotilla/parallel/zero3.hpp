// ZeRO stage 3 (Rajbhandari et al. 2020; PyTorch FSDP's FULL_SHARD): besides AdamW's
// moments and the gradients (stages 1-2, parallel/zero.hpp), each rank keeps only its shard
// of the weights, and a group of them is made whole just before the model reads it.
//
// Vocabulary. The *groups* are the model's parameter groups (model/parallel_context.hpp's
// ParamGroup): the embedding, each decoder block, the head (final norm and an untied
// lm_head), contiguous in the flat arena. A group of n floats is cut as stages 1-2 cut a
// unit: the *chunk* c = floor(n / N), rank r's [begin + r c, begin + (r+1) c); the *tail*,
// the last n - N c floats, every rank's. A rank's *shard* is its chunks and the tails.
// A group is *whole* (every rank's chunk present), *gathering* (its all-gather queued on
// the communication thread) or *released* (only the shard is current; the other ranks'
// chunks' whole pages are handed back to the operating system, base/memory.hpp).
//
// A step:
//   forward      before_group_forward(g): g is made whole (its prefetch waited for, or
//                gathered now), the next group's all-gather is queued on the communication
//                thread (the prefetch, overlapping g's compute), every other group is
//                released. A tied lm_head reads the embedding: the head needs both.
//   backward     before_group_backward(g): the same in reverse order, but for the
//                embedding, whose backward reads no weight (a scatter-add of gradients), and
//                the last block, which stays whole from its forward across the turn (the
//                head's forward keeps it, as FSDP keeps its last layer). Gradient
//                checkpointing recomputes a block inside its backward, on the weights
//                gathered for it. As backward finishes a group (grad_ready), its gradient is
//                reduce-scattered into the shard on the same thread (as stage 2) and its
//                part of the gradient arena released; backward waits when more than two are
//                queued.
//   update       clipping by the global norm, AdamW on the shard; then every group is
//                released (the other ranks' chunks are stale). No all-gather: the next
//                forward gathers.
// Gathers and reduce-scatters share one thread, so each rank issues its collectives in the
// order its hooks came. Each all-gather's name carries the group, the pass and the step: a
// rank whose gather schedule differs (another model, a skipped layer, an extra eval) gets
// a MismatchError naming both operations from the collective's signature check, or a
// TimeoutError naming the late rank, never a hang (comm/communicator.hpp).
//
// At most in flight per rank, besides the shard: the group being read, the next one
// being gathered, and (tied embeddings, at the head) the embedding: the planner charges
// the largest two groups plus, when tied, the embedding.
//
// LoRA (the model's base frozen): the groups are the frozen base's, gathered and released
// as above, and nothing of them is reduced (they have no gradient); backward gathers no
// block below the lowest adapted one, where it stops. The adapters are small: they stay
// whole on every rank, with whole moments, and their gradients are all-reduced after
// backward, as plain data parallelism does (the same bits). sharded() is false then: the
// optimizer and checkpoints see the whole adapters.
// A 4-bit base's packed weights, scales and biases lie outside the float arena: they are
// copied into a packed arena of their own (Llama::own_quantized: only this rank's chunks,
// out of the mapped files), where each group's quantized matrices are a contiguous run,
// cut over the ranks as the floats are and gathered and released with the group's floats.
//
// Tensor parallelism (--parallel dp=D,tp=T; FSDP with Megatron, "2-D"): the model is this
// tp rank's local model (its slices, model/tensor_parallel.hpp) and `dp` its dp group (the
// same tp rank of every replica), so each group of the local arena is cut over the D ranks
// that hold the same slices; the tp all-reduces run inside a block between its gather and
// its release, on the calling thread, while the gathers and reduce-scatters run on the
// communication thread over the dp group. The clipping norm's squares of split tensors add
// over the tp group too (Llama::tensor_parallel_split_ranges), the replicated ones' once.
//
// Bytes per step: each block but the last gathered for forward and again for backward,
// the last block, the embedding and the head once (the head and the last block stay whole
// across the turn; the embedding's backward reads no weight), and a reduce-scatter per
// micro-batch: at most 1.5 times an all-reduce's bytes without accumulation.
#pragma once

#include <memory>
#include <vector>

#include "flotilla/parallel/gradient_sync.hpp"

namespace flotilla::parallel {

struct Zero3Options {
  // Test mode: released weights are filled with NaN instead of handed back, so that a read
  // of a weight that was not gathered makes the loss NaN.
  bool poison_released = false;
};

// The shard stage 3 gives `rank` of `world` ranks in a model of `cfg` (its layout): its
// chunk of every group and every group's tail, ascending in the arena; what the sync's
// owned() returns. Known before the model is built, so that a rank builds, loads and
// touches only these (train/job_model.cpp): the rest of its arena stays unwritten and costs
// no memory until a gather fills it.
std::vector<ArenaRange> zero3_owned_ranges(const model::ModelConfig& cfg, const model::ParamLayout& layout,
                                           int64_t world, int64_t rank);

// InputError for a 4-bit base that is not under LoRA (a quantized base is never trained),
// with bf16 products (the bf16 copy is made of the whole arena) and with a pipeline stage.
std::unique_ptr<GradientSync> make_zero3_sync(model::Llama& model, DataParallel& dp, const Zero3Options& options,
                                              TraceRecorder* trace);

}  // namespace flotilla::parallel
