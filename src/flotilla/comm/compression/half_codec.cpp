// fp16 / bf16: every element travels as 2 bytes, half of float32's traffic.
//
// MPI cannot add halves, and adding them in half precision would lose the gradient, so
// the sum is built from two moves that only carry halves:
//   1. all_to_all: the gradient is cut into one *chunk* per rank; rank j receives chunk j
//      of every rank and adds them in float32 (a reduce-scatter);
//   2. all_gather: each rank's summed chunk, rounded to half once more, goes to all.
// Per rank that sends 2(N-1)/N x 2n bytes, what a ring all-reduce of halves would.
//
// fp16 tops out at 65504 and this rank's gradient is a sum over its tokens, so values are
// scaled first: by (2^15 / N) / max|g| with max over all ranks (one tiny all-reduce), which
// keeps N summed chunks in range and puts the largest values at the top of fp16's
// precision. bf16 has float32's range and needs no scale. What rounding drops on this
// rank goes into the residual (error feedback).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "flotilla/comm/compression/codecs.hpp"
#include "flotilla/tensor/dtype.hpp"

namespace flotilla::comm::detail {
namespace {

class HalfCodec final : public GradientCodec {
 public:
  HalfCodec(Compression kind, int64_t n) : GradientCodec(kind), residual_(static_cast<size_t>(n), 0.0f) {}

  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    check_size(gradient.size(), residual_.size());
    const int N = comm.size();
    const size_t n = gradient.size();
    const size_t chunk = (n + static_cast<size_t>(N) - 1) / static_cast<size_t>(N);
    const size_t padded = chunk * static_cast<size_t>(N);
    for (size_t i = 0; i < n; ++i) gradient[i] += residual_[i];

    float scale = 1.0f;
    if (kind() == Compression::fp16) {
      double max_abs = 0.0;
      for (float g : gradient) max_abs = std::max(max_abs, static_cast<double>(std::fabs(g)));
      comm.all_reduce(std::span<double>(&max_abs, 1), ReduceOp::max, Options{.name = "fp16 scale"});
      count_all_reduce(sizeof(double), N);
      if (max_abs > 0.0) scale = static_cast<float>((32768.0 / N) / max_abs);
    }

    // Encode, and keep what the rounding lost.
    send_.assign(padded, 0);
    for (size_t i = 0; i < n; ++i) {
      send_[i] = encode(gradient[i] * scale);
      residual_[i] = gradient[i] - decode(send_[i]) / scale;
    }
    recv_.resize(padded);
    comm.all_to_all(bytes(send_), mutable_bytes(recv_), Options{.name = "gradient chunks (half)"});
    count_all_to_all(static_cast<int64_t>(padded * 2), N);

    // recv_ holds chunk `rank` of every rank: add them in float32, round once.
    std::vector<uint16_t> summed(chunk);
    for (size_t i = 0; i < chunk; ++i) {
      float s = 0.0f;
      for (int r = 0; r < N; ++r) s += decode(recv_[static_cast<size_t>(r) * chunk + i]);
      summed[i] = encode(s);
    }
    comm.all_gather(bytes(summed), mutable_bytes(send_), Options{.name = "summed chunks (half)"});
    count_all_gather(static_cast<int64_t>(chunk * 2), N);
    for (size_t i = 0; i < n; ++i) gradient[i] = decode(send_[i]) / scale;
    ++calls_;
  }

  std::span<const float> residual() const override { return residual_; }

 private:
  uint16_t encode(float x) const { return kind() == Compression::fp16 ? f32_to_f16(x) : f32_to_bf16(x); }
  float decode(uint16_t h) const { return kind() == Compression::fp16 ? f16_to_f32(h) : bf16_to_f32(h); }
  static std::span<const uint8_t> bytes(const std::vector<uint16_t>& v) {
    return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * 2};
  }
  static std::span<uint8_t> mutable_bytes(std::vector<uint16_t>& v) {
    return {reinterpret_cast<uint8_t*>(v.data()), v.size() * 2};
  }

  std::vector<float> residual_;  // (n)
  std::vector<uint16_t> send_;   // (N * chunk) this rank's halves; then the summed ones
  std::vector<uint16_t> recv_;   // (N * chunk) chunk `rank` of every rank
};

}  // namespace

std::unique_ptr<GradientCodec> make_half_codec(Compression kind, int64_t n) {
  return std::make_unique<HalfCodec>(kind, n);
}

}  // namespace flotilla::comm::detail
