// Tensor parallelism (Megatron-LM's column/row split) as the model sees it. model/ sits
// below comm/ and parallel/ (DESIGN.md), so a block cannot call an all-reduce itself; it
// calls this interface, which parallel/tensor_parallel.hpp implements over the mesh's tp
// group.
//
// Vocabulary. A *full* model is the one a single rank trains; a tp rank holds a *local*
// model of the same depth whose attention has n_heads / tp query heads and n_kv_heads / tp
// key-value heads (GQA: each rank keeps whole groups, so head h still reads kv head
// h / (n_heads / n_kv_heads)) and whose MLP is ffn_dim / tp wide. Its tensors are *slices*
// of the full ones, in PyTorch's (out, in) layout:
//   - column-parallel (q, k, v and their biases, gate, up): a range of output rows, which
//     is a contiguous range of the full tensor;
//   - row-parallel (o, down): a range of input columns, a strided piece of the full tensor
//     (one run of in/tp floats per row);
//   - vocabulary-parallel (the embedding and lm_head, tied or not): a range of vocabulary
//     rows (vocab_shard), contiguous, and not the same size on every rank when tp does not
//     divide the vocabulary;
//   - replicated (norms): the whole tensor.
// The local model stores each slice as a dense tensor of its own shape, so every kernel,
// the activation plan and the block itself run unchanged on it; only where a row-parallel
// layer ends does a block add its ranks' partial outputs (all_reduce_sum), and backward
// does the same to d(ln) where the column-parallel layers start: Megatron's g and f.
// At the model's two ends (Megatron's vocabulary-parallel embedding and cross-entropy):
// the embedding looks up the rows this rank holds, zeros for the other tokens, and an
// all-reduce sums them into every rank's whole input; lm_head gives each rank its slice
// of the logits (B, T, V/tp), which are never gathered: the loss takes each row's max
// (all-reduce max), its sum of exp (all-reduce sum) and the target's logit from the rank
// that holds it (in the same all-reduce), and backward writes softmax - one-hot into the
// slice and all-reduces d(lnf), as after any column-parallel layer.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "flotilla/model/config.hpp"
#include "flotilla/model/params.hpp"
#include "flotilla/tensor/quant.hpp"

namespace flotilla::model {

class Llama;

class TensorParallelGroup {
 public:
  virtual ~TensorParallelGroup() = default;
  virtual int tp_size() const = 0;
  virtual int tp_rank() const = 0;
  // values summed in place over the tp group (every rank gets the same sum, bit for bit).
  // `what` names the collective in errors and traces.
  virtual void all_reduce_sum(std::span<float> values, const char* what) = 0;
  virtual void all_reduce_sum(std::span<double> values, const char* what) = 0;
  // values replaced in place by their elementwise max over the tp group.
  virtual void all_reduce_max(std::span<float> values, const char* what) = 0;
  // Sequence parallelism (SequenceShard): whole = (tp_size, n), chunk r = rank r's slice
  // (n floats); and its reverse, slice = chunk tp_rank of the sum of every rank's whole.
  // The two spans never overlap.
  virtual void all_gather(std::span<const float> slice, std::span<float> whole, const char* what) = 0;
  virtual void reduce_scatter_sum(std::span<const float> whole, std::span<float> slice, const char* what) = 0;
};

// A tp rank's place in its group: what a rank's slices depend on.
struct TpRank {
  int rank = 0;
  int size = 1;
};

// The vocabulary rows [begin, end) tp rank `at` holds of the embedding and lm_head: the
// balanced split [r V / tp, (r + 1) V / tp), so a vocabulary tp does not divide leaves
// some ranks one row more than others (37 over 2: 18 and 19 rows). InputError when the
// vocabulary has fewer rows than tp.
struct VocabShard {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
VocabShard vocab_shard(int64_t vocab_size, TpRank at);

// Sequence parallelism (Megatron-LM's, Korthikanti et al. 2022): between the tensor-parallel
// regions the residual stream, the norms and the residual adds are sharded along the
// B x T token rows; a column-parallel region starts with an all-gather of its input and a
// row-parallel one ends with a reduce-scatter of its partial sums (their backwards swap
// them). The rows are cut in tp_size slices of `rows` each, rank r's [r rows, (r+1) rows):
// when tp_size does not divide the tokens the last slices are padded with zero rows
// (`real` counts a rank's tokens; 10 tokens over 4 ranks: slices of 3, real 3, 3, 3, 1).
struct SequenceShard {
  int64_t size = 1;   // tp ranks
  int64_t rows = 0;   // a slice's rows, padding included: ceil(N / tp)
  int64_t begin = 0;  // this rank's first row
  int64_t real = 0;   // this rank's rows that are tokens (the rest are padding)
  int64_t padded() const { return rows * size; }  // rows of a gathered buffer
};
SequenceShard sequence_shard(int64_t tokens, TpRank at);

// Tp rank `at`'s local model config: heads, kv heads and ffn_dim divided by tp, and the
// vocabulary its shard (vocab_shard). InputError (one line) when tp does not divide
// n_heads, n_kv_heads or ffn_dim (a mixture of experts': each expert's width and the
// shared expert's, which are divided alike), the vocabulary is smaller than tp, a 4-bit
// mixture of experts, or a quantized o or down matrix's input columns would not be cut on
// its quantization groups (see QuantSlice below).
ModelConfig tensor_parallel_config(const ModelConfig& full, TpRank at);

// How tp rank r holds a full tensor, found from the two shapes.
enum class TensorSlice : uint8_t { replicated, rows, columns };
TensorSlice tensor_slice(const ParamInfo& full, const ParamInfo& local);

// The floats of the full tensor that tp rank `at` holds, ascending: one range for a
// replicated or row slice, one per row for a column slice. Offsets are the full layout's.
std::vector<ElementRange> slice_ranges(const ParamInfo& full, const ParamInfo& local, TpRank at);

// local (its shape) = rank's slice of full (the full tensor's floats); and the reverse, which
// writes the slice into its place in `full` (gathering a model).
void copy_slice_out(const ParamInfo& full, const ParamInfo& local, TpRank at, std::span<const float> full_values,
                    std::span<float> local_values);
void copy_slice_in(const ParamInfo& full, const ParamInfo& local, TpRank at, std::span<const float> local_values,
                   std::span<float> full_values);

// The local model's weights as Llama::init_random(seed) would write them into a full model,
// sliced for `at`: the same random stream over the full layout, drawn only where the
// slices are (bit for bit the one-rank model's values, and never a full tensor in memory).
// Tensors `local` does not hold (Llama::hold_only: another pipeline stage's) are skipped.
// `shard` (ZeRO-3 x tp: ranges of the local arena, ascending and disjoint; empty: all):
// only the floats inside it are written, the rest of the arena never touched.
void init_random_slices(Llama& local, const ModelConfig& full, TpRank at, uint64_t seed,
                        std::span<const ElementRange> shard = {});

// fn(full_begin, local_begin, n) for each piece of rank `at`'s slice of `full` (its local
// tensor `local`) that lies inside `shard` (local-arena ranges, ascending and disjoint;
// empty: the whole slice), in order.
void for_each_slice_piece(const ParamInfo& full, const ParamInfo& local, TpRank at, std::span<const ElementRange> shard,
                          const std::function<void(int64_t, int64_t, int64_t)>& fn);

// The squared sum of a window [begin, end) of an arena, in two parts: the floats inside
// `split` (ascending, disjoint arena ranges: a tp rank's slices of split tensors, whose
// squares add over the tp group) and the others (replicated, counted once). values[0] is
// the arena's float `begin`. Double accumulation, as kernels::sum_squares.
struct SquareSums {
  double replicated = 0.0, split = 0.0;
};
SquareSums square_sums(const float* values, int64_t begin, int64_t end, std::span<const ElementRange> split);

// The local model's weights sliced from a whole float model in memory (a model directory is
// read slice by slice instead: model/tensor_parallel_io.hpp; a quantized model in memory is
// sliced by Llama::tensor_parallel_slice).
void take_slices(Llama& local, const Llama& full, TpRank at);

// Quantized (4-bit) bases. A quantized matrix's groups run along its rows (tensor/quant.hpp),
// so a row slice (column-parallel q, k, v, gate, up; the vocabulary's embedding and lm_head)
// is its rows' packed words, scales and biases, contiguous, taken as a view; and a column
// slice (row-parallel o, down) is a copy of each row's words and groups of the rank's
// columns, which must be whole groups: tensor_parallel_config refuses a quantized model
// whose o or down share (in / tp columns) is not a multiple of the group size, naming the
// tensor, the group size and tp. Either way the slice holds exactly the full matrix's
// values of its elements (no re-quantization).
struct QuantSlice {
  QuantMatrix matrix;
  std::shared_ptr<const void> owned;  // a column slice's copy; null: matrix views full's bytes
};
// Tp rank `at`'s slice of `full` (tensor full_info), shaped as local_info says.
QuantSlice slice_quantized(const QuantMatrix& full, const ParamInfo& full_info, const ParamInfo& local_info, TpRank at);

}  // namespace flotilla::model
