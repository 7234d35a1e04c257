// fp16 / bf16 (and the compression warm-up in any narrow dtype): every element travels in
// the wire dtype, summed by WireSum (wire_sum.hpp: an all-to-all reduce-scatter and an
// all-gather of the encoded values). What rounding drops on this rank goes into the
// residual (error feedback).
#include <vector>

#include "flotilla/comm/compression/codecs.hpp"
#include "flotilla/comm/compression/wire_sum.hpp"

namespace flotilla::comm::detail {
namespace {

class DenseCodec final : public ErrorFeedbackCodec {
 public:
  // The residual is what this rank's rounding dropped.
  DenseCodec(Compression kind, WireDtype dtype, int64_t n) : ErrorFeedbackCodec(kind, n), sum_(dtype) {}

  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    check_size(gradient.size(), residual_.size());
    for (size_t i = 0; i < gradient.size(); ++i) gradient[i] += residual_[i];
    count_bytes(sum_.run(gradient, comm, residual_, "gradient chunks (narrow)"));
    ++calls_;
  }


 private:
  WireSum sum_;
};

}  // namespace

std::unique_ptr<GradientCodec> make_dense_codec(Compression kind, WireDtype dtype, int64_t n) {
  return std::make_unique<DenseCodec>(kind, dtype, n);
}

}  // namespace flotilla::comm::detail
