// The gradient sync of full fine-tuning under expert parallelism when each rank holds only
// its block of every MoE layer's experts (model::Llama::hold_only with experts). The arena
// splits in two kinds of tensor:
//   *shared*  everything but the experts (attention, router, norms, embeddings, a shared
//             expert): every rank of the data group (dp x ep) holds them and sums their
//             gradients over it, as plain data parallelism does;
//   *expert*  a block of experts: only the ranks with the same ep coordinate hold it (the
//             mesh's dp group, this block's *replicas*), and its gradient is summed over
//             them alone: the other ranks neither hold these weights nor compute a gradient
//             for them.
// A rank owns (updates) the shared tensors and its own experts: owned() is its held part,
// each tensor's range reaching to the next tensor's offset (the alignment padding), and
// its optimizer holds moments for that part only. The gradient norm is the global one: the
// shared part's sum of squares (the same on every rank after the sum) plus the expert
// parts' summed over the ep group.
//
// Checkpoints (sole_owned): the shared tensors cut into equal parts over the data group,
// each block of experts written by its replica of dp index 0; every float of the arena is
// in one rank's file, so a checkpoint resumes on any world (train/sharded_checkpoint.hpp).
// The final model: world rank 0 writes it tensor by tensor; an expert tensor of another
// block comes to it from that block's rank in its ep group, in layout order, and is
// released once written (weights_sharded, gather_weights_through, end_weight_pass).
//
// LoRA over such a base: the trainable arena is the adapters', cut the same way by name
// (an expert's adapters are expert tensors). Every rank holds all of them but sums and
// updates only the shared ones and its own experts' (moments for those only); the others'
// stay as they were, never read, since their experts run elsewhere. complete_weights
// brings every expert's adapters from its block's rank before the adapters are saved.
#pragma once

#include <memory>

#include "flotilla/parallel/expert_parallel.hpp"
#include "flotilla/parallel/gradient_sync.hpp"

namespace flotilla::parallel {

// `data` (the data group's DataParallel) and `experts` (whose replica group may be null:
// dp = 1) must outlive the sync. Error unless the model holds exactly the experts its
// exchange runs. Every rank of the data group makes one.
std::unique_ptr<GradientSync> make_expert_sync(model::Llama& model, DataParallel& data, ExpertParallel& experts);

}  // namespace flotilla::parallel
