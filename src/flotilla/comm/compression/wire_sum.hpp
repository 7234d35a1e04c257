// A sum over ranks whose values travel in a narrow wire type: 2-byte halves (fp16, bf16)
// or 8-bit integers with a scale per run of values (int8). The fp16 and bf16 codecs send
// whole gradients this way; PowerSGD sends its factors this way, and the compression
// warm-up its dense gradients, under `--compression-dtype`.
//
// MPI cannot add these types, and adding them in the narrow type would lose the sum, so it
// is built from two moves that only carry the narrow type:
//   1. all_to_all: the buffer is cut into one *chunk* per rank; rank j receives chunk j
//      of every rank and adds them in float32 (a reduce-scatter);
//   2. all_gather: each rank's summed chunk, encoded once more, goes to all.
// Per rank that sends 2(N-1)/N x the encoded size, what a ring all-reduce of it would.
//
// fp16 tops out at 65504, so values are scaled first: by (2^15 / N) / max|x| with max over
// all ranks (one tiny all-reduce), which keeps N summed chunks in range and puts the
// largest values at the top of fp16's precision. bf16 has float32's range and needs no
// scale. int8 is symmetric and scaled per run of kInt8Run values (int8_scale below): a
// chunk is its runs' float scales followed by its values, 1 + 4/64 bytes a value.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "flotilla/comm/compression/gradient_codec.hpp"

namespace flotilla::comm::detail {

class WireSum {
 public:
  explicit WireSum(WireDtype dtype);  // fp16, bf16 or int8
  // data := the sum over ranks of every rank's data, as decoded values (the same on every
  // rank). When `rounding` is not empty (data.size() floats) it receives what encoding
  // this rank's own values lost: data - decode(encode(data)), before the sum, the part
  // error feedback keeps. Returns the bytes this rank sent (gradient_codec.hpp's convention).
  int64_t run(std::span<float> data, Communicator& comm, std::span<float> rounding, std::string_view name);
  // Step 1 alone (a reduce-scatter for ZeRO): data is cut into N chunks of chunk_size(n, N)
  // values (zero past its end); `mine` (chunk_size values) := the float32 sum over ranks of
  // every rank's encoded chunk `rank`, added in rank order. Rounding and the return as run().
  int64_t reduce_scatter(std::span<const float> data, Communicator& comm, std::span<float> mine,
                         std::span<float> rounding, std::string_view name);
  size_t chunk_size(size_t n, int N) const;  // ceil(n / N); int8: whole runs

 private:
  size_t encoded_bytes(size_t values) const;  // one chunk of `values` values on the wire
  // Step 1 into sum_ (chunk values): the encoding, the all-to-all, the float32 sum.
  int64_t reduce_scatter_into_sum(std::span<const float> data, Communicator& comm, std::span<float> rounding,
                                  std::string_view name);
  // out := encode(x); rounding (may be null) := x - decode(out).
  void encode(const float* x, size_t count, uint8_t* out, float* rounding) const;
  // out[i] (+)= decode(in)[i]: assigned, or added when `add`.
  void decode(const uint8_t* in, size_t count, float* out, bool add) const;

  WireDtype dtype_;
  float scale_ = 1.0f;        // fp16: the range scale of this call
  std::vector<float> padded_; // (N * chunk) this rank's values, zero after data's end
  std::vector<float> sum_;    // (N * chunk) this rank's rounding; then its chunk's sum
  std::vector<uint8_t> send_; // (N chunks) this rank's encoding; then every summed chunk
  std::vector<uint8_t> recv_; // (N chunks) chunk `rank` of every rank
  std::vector<uint8_t> summed_;  // (1 chunk) this rank's summed chunk, encoded
};

// One 16-bit encoding for top-k's values and the half sums: round to nearest even.
uint16_t encode_half(WireDtype dtype, float x);
float decode_half(WireDtype dtype, uint16_t h);

// int8: symmetric, q = round(x / s) in [-127, 127] with s = max|x| / 127 over each run of
// kInt8Run consecutive values (a float per run), so the largest value of a run is exact
// to float rounding and every value is within s / 2. A run of zeros has s = 0.
constexpr int64_t kInt8Run = 64;
float int8_scale(const float* x, int64_t count);
int8_t encode_int8(float x, float scale);
inline float decode_int8(int8_t q, float scale) { return static_cast<float>(q) * scale; }
// One run of `count` (<= kInt8Run) values: q[i] := encode_int8(x[i], s), and returns s;
// rounding[i] (when not null) := x[i] - decode_int8(q[i], s), what error feedback keeps.
float encode_int8_run(const float* x, int64_t count, int8_t* q, float* rounding);

}  // namespace flotilla::comm::detail
