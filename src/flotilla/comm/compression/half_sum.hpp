// A sum over ranks whose values travel as 2-byte halves (fp16 or bf16). The fp16 and bf16
// codecs send whole gradients this way; PowerSGD sends its factors this way under
// `--compression-dtype`.
//
// MPI cannot add halves, and adding them in half precision would lose the sum, so it is
// built from two moves that only carry halves:
//   1. all_to_all: the buffer is cut into one *chunk* per rank; rank j receives chunk j
//      of every rank and adds them in float32 (a reduce-scatter);
//   2. all_gather: each rank's summed chunk, rounded to half once more, goes to all.
// Per rank that sends 2(N-1)/N x 2n bytes, what a ring all-reduce of halves would.
//
// fp16 tops out at 65504, so values are scaled first: by (2^15 / N) / max|x| with max over
// all ranks (one tiny all-reduce), which keeps N summed chunks in range and puts the
// largest values at the top of fp16's precision. bf16 has float32's range and needs no scale.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "flotilla/comm/compression/gradient_codec.hpp"

namespace flotilla::comm::detail {

class HalfSum {
 public:
  explicit HalfSum(WireDtype dtype);  // fp16 or bf16
  // data := the sum over ranks of every rank's data, as decoded halves (the same on every
  // rank). When `rounding` is not empty (data.size() floats) it receives what encoding
  // this rank's own values lost: data - decode(encode(data)), before the sum, the part
  // error feedback keeps. Returns the bytes this rank sent (gradient_codec.hpp's convention).
  int64_t run(std::span<float> data, Communicator& comm, std::span<float> rounding, std::string_view name);

 private:
  uint16_t encode(float x) const;
  float decode(uint16_t h) const;

  WireDtype dtype_;
  std::vector<uint16_t> send_;    // (N * chunk) this rank's halves; then the summed ones
  std::vector<uint16_t> recv_;    // (N * chunk) chunk `rank` of every rank
  std::vector<uint16_t> summed_;  // (chunk) this rank's chunk, summed and rounded
};

// One 16-bit encoding for top-k's values and the half sums: round to nearest even.
uint16_t encode_half(WireDtype dtype, float x);
float decode_half(WireDtype dtype, uint16_t h);

}  // namespace flotilla::comm::detail
