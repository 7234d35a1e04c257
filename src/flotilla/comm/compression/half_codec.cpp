// fp16 / bf16: every element travels as 2 bytes, half of float32's traffic, summed by
// HalfSum (half_sum.hpp: an all-to-all reduce-scatter and an all-gather of halves, fp16
// scaled into range). What rounding drops on this rank goes into the residual (error
// feedback).
#include <vector>

#include "flotilla/comm/compression/codecs.hpp"
#include "flotilla/comm/compression/half_sum.hpp"

namespace flotilla::comm::detail {
namespace {

class HalfCodec final : public GradientCodec {
 public:
  HalfCodec(Compression kind, int64_t n)
      : GradientCodec(kind),
        sum_(kind == Compression::fp16 ? WireDtype::fp16 : WireDtype::bf16),
        residual_(static_cast<size_t>(n), 0.0f) {}

  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    check_size(gradient.size(), residual_.size());
    for (size_t i = 0; i < gradient.size(); ++i) gradient[i] += residual_[i];
    count_bytes(sum_.run(gradient, comm, residual_, "gradient chunks (half)"));
    ++calls_;
  }

  std::span<const float> residual() const override { return residual_; }

 private:
  HalfSum sum_;
  std::vector<float> residual_;  // (n) what this rank's rounding dropped
};

}  // namespace

std::unique_ptr<GradientCodec> make_half_codec(Compression kind, int64_t n) {
  return std::make_unique<HalfCodec>(kind, n);
}

}  // namespace flotilla::comm::detail
