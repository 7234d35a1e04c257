// Tensor parallelism over the mesh (--parallel tp=T): the model's TensorParallelGroup
// (model/tensor_parallel.hpp) on the mesh's tp group, whose ranks hold a slice of every
// block's linear layers and add their partial sums with all-reduces, two per block each
// way (forward: after o and down; backward: into d(ln1) and d(ln2)). It counts what it
// moves, and it gathers the slices into one whole model for writing.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "flotilla/comm/algorithms/all_reduce.hpp"
#include "flotilla/comm/communicator.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/tensor_parallel.hpp"

namespace flotilla::parallel {

class TensorParallel final : public model::TensorParallelGroup {
 public:
  // `tp` must outlive this; every rank of it makes one alike (collective over `tp`: the
  // AllReducer discovers the hosts). The float collectives (the activations' all-reduces,
  // sequence parallelism's all-gathers and reduce-scatters) run on flotilla's own
  // algorithms (comm::AllReducer: ring between hosts, the host's shared-memory arena on
  // one), which keep ~0.95 of a TCP link where the MPI library's keep about half under
  // Open MPI's default settings (plan/link.hpp); `algorithm` is `flotilla train
  // --allreduce` (mpi: the library's own). Every rank gets the same bits: each chunk is
  // reduced on one rank and copied to the others. The double and int collectives (the
  // gradient norm, the weights' check) stay on the library.
  explicit TensorParallel(comm::Communicator& tp,
                          comm::AllReduceAlgorithm algorithm = comm::AllReduceAlgorithm::automatic);

  int tp_size() const override { return tp_.size(); }
  int tp_rank() const override { return tp_.rank(); }
  void all_reduce_sum(std::span<float> values, const char* what) override;
  void all_reduce_sum(std::span<double> values, const char* what) override;
  void all_reduce_max(std::span<float> values, const char* what) override;
  void all_gather(std::span<const float> slice, std::span<float> whole, const char* what) override;
  void reduce_scatter_sum(std::span<const float> whole, std::span<float> slice, const char* what) override;
  comm::Communicator& communicator() { return tp_; }
  comm::AllReducer& reducer() { return reducer_; }

  // Bytes of the activation all-reduces (each counted once at its size, n floats x 4, as
  // the formula 2 x 2 x B x T x C x 4 per layer and step counts them, plus the embedding's
  // and d(lnf)'s B x T x C and the cross-entropy's 3 x B x T) and their number. Sequence
  // parallelism's all-gathers and reduce-scatters count at their whole buffer's size, half
  // each: an all-gather and a reduce-scatter of n floats move what one all-reduce of n does.
  uint64_t bytes_reduced() const { return bytes_reduced_; }
  uint64_t all_reduces() const { return all_reduces_; }
  // What this rank sent over the tp group for all of the above (ring algorithms: an
  // all-reduce of n bytes sends 2 (T-1)/T n, an all-gather or a reduce-scatter (T-1)/T n).
  uint64_t bytes_sent() const { return bytes_sent_; }
  // Off: the collectives run uncounted (validation's forwards, so the counts are per
  // training step's).
  void set_counting(bool on) { counting_ = on; }

  // Called with a local tensor's offset just before that tensor of the local arena is read,
  // in ascending order: ZeRO-3 x tp makes the group holding it whole over the dp group
  // (GradientSync::gather_weights_through). Empty: the local arena is whole already.
  using BeforeRead = std::function<void(int64_t local_offset)>;

  // InternalError naming the tensor-parallel ranks when the replicated tensors (the norms)
  // of `local` differ between them: they are computed alike by
  // construction, so a difference is a bug, never noise.
  void check_replicated_same(const model::Llama& local, const BeforeRead& before_read = {});

  // The whole model, on tp rank 0: its replicated tensors and every rank's slices put in
  // place; the other ranks send their slices and get none. Every rank calls it alike.
  std::optional<model::Llama> gather_full_model(const model::Llama& local, const BeforeRead& before_read = {});
  // The same for LoRA adapters on column-parallel layers (each B a range of output rows):
  // the whole adapters of the full model, on tp rank 0.
  std::optional<model::LoraAdapters> gather_full_adapters(const model::LoraAdapters& local,
                                                          const model::ModelConfig& full);

 private:
  comm::Communicator& tp_;
  comm::AllReducer reducer_;
  // reduce_scatter_sum's copy of `whole` (the AllReducer works in place; `whole` is
  // const): grown once to the largest, then reused.
  std::vector<float> scatter_scratch_;
  uint64_t bytes_reduced_ = 0;
  uint64_t all_reduces_ = 0;
  uint64_t bytes_sent_ = 0;
  bool counting_ = true;
  // Counts a collective of `size_bytes` (the whole buffer's; an all-gather or a
  // reduce-scatter as half an all-reduce) that sent `sent` bytes.
  void count(uint64_t size_bytes, uint64_t sent, bool all_reduce);
};

}  // namespace flotilla::parallel
