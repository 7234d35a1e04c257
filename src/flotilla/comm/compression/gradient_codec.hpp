// Gradient compression: all-reduce a gradient (a sum over ranks) while sending fewer bytes.
//
// Vocabulary used by every codec here:
//   - the *gradient* is this rank's flat float buffer (n elements); the codec replaces it
//     in place by an estimate of the SUM of every rank's gradient;
//   - a *tensor* is a part of it (offset, rows, cols; a vector has one row): top-k selects
//     within each tensor, PowerSGD compresses each matrix big enough to gain as a low-rank
//     product and sends the rest uncompressed;
//   - the *residual* is what compression left out on this rank at the last step. Lossy
//     codecs add it to the next gradient before compressing (error feedback, Seide et al.
//     2014; Karimireddy et al. 2019), so nothing is lost for good, only delayed.
//
// The codecs run on the Communicator's collectives (all_reduce, all_gather, all_to_all),
// so they work on every backend. bytes_sent() counts what this rank sends per call as a
// ring implementation of those collectives would (all_reduce of b bytes: 2(N-1)/N b;
// all_gather of b bytes from each rank: (N-1) b; all_to_all of b bytes in total:
// (N-1)/N b; comm/wire_bytes.hpp), the same convention for the uncompressed baseline, so ratios are fair.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/comm/algorithms/all_reduce.hpp"
#include "flotilla/comm/communicator.hpp"
#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::comm {

enum class Compression : uint8_t {
  none,      // float32 all-reduce
  fp16,      // IEEE half: 2 bytes per element, scaled into fp16's range
  bf16,      // bfloat16: 2 bytes per element, float32's range
  topk,      // the k largest magnitudes as (index, value) pairs
  powersgd,  // rank-r factors P (rows x r) and Q (cols x r) of each matrix
};

std::string_view compression_name(Compression c);
// "none", "fp16", "bf16", "topk", "powersgd"; throws InputError on anything else.
Compression parse_compression(std::string_view name);

// The type top-k's values and PowerSGD's factors (and the warm-up's dense gradients) travel
// in. float32 keeps top-k's (uint32 index, float) pairs; with a narrower type top-k sends
// each 2^16-element block's entries with 16-bit offsets or a bitmap (topk_codec.cpp), and
// PowerSGD sends fewer bytes for the same rank. bf16/fp16: 2 bytes a value; int8: 1 byte a
// value plus a float scale per 64 values (wire_sum.hpp). Error feedback keeps what the
// rounding lost, so the narrow types only delay it.
enum class WireDtype : uint8_t { f32, bf16, fp16, int8 };
std::string_view wire_dtype_name(WireDtype d);
// "f32", "bf16", "fp16", "int8"; throws InputError on anything else.
WireDtype parse_wire_dtype(std::string_view name);

struct CompressionConfig {
  Compression kind = Compression::none;
  double topk_density = 0.01;  // top-k: fraction of elements sent, in (0, 1]
  int powersgd_rank = 4;       // PowerSGD: r
  WireDtype dtype = WireDtype::f32;  // top-k's values, PowerSGD's factors
  uint64_t seed = 0;           // PowerSGD: the initial Q (every rank draws the same)
  // Dense exchanges before compression starts, as PyTorch's PowerSGD hook
  // (start_powerSGD_iter) and Deep Gradient Compression's warm-up do: the first steps
  // move the weights most, and an adaptive optimizer's moments settle on full gradients.
  // In float32, or in `dtype` when it is narrower (halves: within 0.01% of float32 on the
  // sample run, at half the bytes).
  int64_t warmup_steps = 0;
};

// A named part of a codec's state (GradientCodec::save_state): float32 values; integers
// (counts, a generator's words) travel as 16-bit pieces, each exact in a float.
struct CodecState {
  std::string name;
  std::vector<float> values;
};

struct MatrixShape {
  int64_t offset = 0;  // into the gradient, in floats
  int64_t rows = 0, cols = 0;  // a vector: 1 x size
};

class GradientCodec {
 public:
  virtual ~GradientCodec() = default;
  // gradient := an estimate of the sum of every rank's gradient (exact for none; lossy
  // codecs keep this rank's residual). Every rank calls it with the same n.
  virtual void all_reduce_sum(std::span<float> gradient, Communicator& comm) = 0;
  Compression kind() const { return kind_; }
  // What this rank has sent so far, in bytes (see the convention above).
  int64_t bytes_sent() const { return bytes_sent_; }
  int64_t calls() const { return calls_; }
  // This rank's residual (n floats; empty for the exact codec): what it still owes.
  virtual std::span<const float> residual() const { return {}; }
  // Everything a run resumed on the same world needs to continue exactly as if it had not
  // stopped: the calls so far (the warm-up's position) and bytes sent, the error-feedback
  // residual, PowerSGD's warm start and generator. load_state takes back what save_state
  // gave (InputError naming the part that is missing or of another size).
  virtual std::vector<CodecState> save_state() const;
  virtual void load_state(const std::vector<CodecState>& state);
  // Float32 sums (the exact codec's, PowerSGD's factors) go through this all-reducer
  // (flotilla's algorithms, `train --allreduce`) instead of the backend's all_reduce.
  virtual void set_exact_reducer(AllReducer* reducer) { exact_ = reducer; }

 protected:
  explicit GradientCodec(Compression kind) : kind_(kind) {}
  // sum over ranks of a float buffer, in place: by the exact reducer when one is set.
  void sum_floats(std::span<float> data, Communicator& comm, std::string_view name);
  AllReducer* exact_ = nullptr;
  // A codec is made for one gradient size; another is a programming error.
  static void check_size(size_t given, size_t expected);
  void count_all_reduce(int64_t bytes, int world);
  void count_all_gather(int64_t bytes_per_rank, int world);
  void count_all_to_all(int64_t total_bytes, int world);
  void count_bytes(int64_t bytes);
  // For save_state/load_state: the part `name` of `state`, of `size` values.
  static const std::vector<float>& state_part(const std::vector<CodecState>& state, std::string_view name, size_t size);
  static std::vector<float> words_to_floats(std::span<const uint64_t> words);
  static void floats_to_words(const std::vector<float>& values, std::span<uint64_t> words);
  int64_t calls_ = 0;

 private:
  Compression kind_;
  int64_t bytes_sent_ = 0;
};

// The lossy codecs' common part: this rank's error-feedback residual (n floats), what it
// still owes, saved and restored with the rest of the codec's state.
class ErrorFeedbackCodec : public GradientCodec {
 public:
  std::span<const float> residual() const override { return residual_; }
  std::vector<CodecState> save_state() const override;
  void load_state(const std::vector<CodecState>& state) override;

 protected:
  ErrorFeedbackCodec(Compression kind, int64_t n) : GradientCodec(kind), residual_(static_cast<size_t>(n), 0.0f) {}
  std::vector<float> residual_;  // (n)
};

// A codec for gradients of n floats made of `tensors` (may be empty: one flat tensor).
// Throws InputError for a density, rank or warm-up out of range.
std::unique_ptr<GradientCodec> make_gradient_codec(const CompressionConfig& config, int64_t n,
                                                   std::vector<MatrixShape> tensors);

}  // namespace flotilla::comm
