// From prepared examples to training batches, the same for any number of ranks.
//
// Vocabulary:
//   epoch          one pass over a split's examples in an order drawn from (seed, epoch)
//   row            T input positions: one example (padding) or several (packing), each
//                  example taking min(n, T) positions; targets are the next token inside the
//                  same example where its loss mask says so, kIgnoreIndex elsewhere
//   global batch   G = micro_batch x world x grad_accum rows, built from the example order
//                  alone — so the same seed yields the same global batches whether 1, 2 or
//                  4 ranks share them
//   micro-batch    micro_batch consecutive rows of the global batch: micro-step a of rank r
//                  takes rows [(a * world + r) * micro_batch, +micro_batch), so ranks hold
//                  disjoint slices whose union is the global batch
// Packing fills a row with consecutive examples while they fit (an example that does not
// fit starts the next row); doc_start tells the model where each example begins, so
// examples never attend across their boundaries. Padded positions carry no loss.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/data/text_dataset.hpp"
#include "flotilla/data/token_shards.hpp"

namespace flotilla::data {

// The examples of one split, in a fixed order. Implemented by prepared token datasets and
// by tests.
class ExampleSource {
 public:
  virtual ~ExampleSource() = default;
  virtual size_t num_examples() const = 0;
  virtual ExampleView example(size_t i) const = 0;
};

struct SamplerConfig {
  int64_t seq_len = 128;     // T
  int64_t micro_batch = 4;   // rows per micro-batch on one rank
  int64_t grad_accum = 1;    // micro-batches per optimizer step on one rank
  int rank = 0;
  int world = 1;
  bool pack = true;          // false: one example per row, padded
  bool shuffle = true;       // false: examples in their stored order (evaluation)
  bool repeat = true;        // false: stop after one epoch (evaluation)
  uint64_t seed = 0;
  int32_t pad_id = 0;        // input id at padded positions (never in the loss)

  int64_t global_rows() const { return micro_batch * world * grad_accum; }
};

// What rows of seq_len positions keep of a split's examples. A row's T positions hold
// tokens 0..T-1 and predict tokens 1..T, so an example of n <= T + 1 tokens keeps all its
// targets; a longer one loses those of tokens T+1..n-1.
struct TruncationStats {
  int64_t examples = 0;
  int64_t targets = 0;            // target tokens of the split (mask 1, each first token aside)
  int64_t truncated = 0;          // examples longer than T + 1 tokens
  int64_t targets_lost = 0;       // targets past the row
  int64_t without_targets = 0;    // examples with no target left in the row
  int64_t longest = 0;            // tokens of the longest example
};
TruncationStats truncation_at(const ExampleSource& examples, int64_t seq_len);

class BatchSampler final : public BatchSource {
 public:
  // `examples` must outlive the sampler. InputError for an empty source or bad sizes.
  BatchSampler(const ExampleSource& examples, SamplerConfig cfg);

  // This rank's next micro-batch: B = micro_batch rows of T = seq_len. With repeat off,
  // returns false (and fills nothing) once the epoch's examples are used up; a final
  // partial global batch is padded with rows that carry no loss.
  bool next(Batch& batch);
  void next_batch(Batch& batch) override;
  void next_batch(int32_t* tokens, int32_t* targets, int B, int T) override;  // padding mode only

  // {"kind": "batch_sampler", "epoch", "position", "micro_step", "examples", "global_rows",
  //  "seq_len", "pack", "seed"}: restoring it rebuilds the current global batch and resumes
  // at the same micro-batch. A state from a different data or batch geometry is an
  // InputError (the world size may differ: the global batch is the same).
  nlohmann::json state() const override;
  void set_state(const nlohmann::json& state) override;

  int64_t epoch() const { return epoch_; }
  // Examples whose tokens did not all fit in a row (cut at seq_len).
  int64_t truncated() const { return truncated_; }

 private:
  void start_epoch(int64_t epoch);
  bool build_global_batch();
  size_t order(size_t i) const { return cfg_.shuffle ? permutation_[i] : i; }

  const ExampleSource& examples_;
  SamplerConfig cfg_;
  int64_t epoch_ = 0;
  std::vector<uint32_t> permutation_;  // (E,) this epoch's order
  size_t position_ = 0;        // next example in the order, for the next global batch
  int64_t batch_epoch_ = 0;    // epoch_ and position_ when the current global batch was built
  size_t batch_start_ = 0;
  int64_t micro_step_ = 0;     // micro-batches of the current global batch handed out
  bool have_batch_ = false;
  bool exhausted_ = false;
  int64_t truncated_ = 0;
  // The current global batch, (G, T) each.
  std::vector<int32_t> tokens_, targets_, doc_start_;
  std::vector<uint8_t> mask_scratch_;
};

}  // namespace flotilla::data
