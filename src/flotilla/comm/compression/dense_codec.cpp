// fp16 / bf16 (and the compression warm-up in any narrow dtype): every element travels in
// the wire dtype, summed by WireSum (wire_sum.hpp: an all-to-all reduce-scatter and an
// all-gather of the encoded values). What rounding drops on this rank goes into the
// residual (error feedback).
#include <vector>

#include "flotilla/comm/compression/codecs.hpp"
#include "flotilla/comm/compression/wire_sum.hpp"

namespace flotilla::comm::detail {
namespace {

class DenseCodec final : public GradientCodec {
 public:
  DenseCodec(Compression kind, WireDtype dtype, int64_t n)
      : GradientCodec(kind), sum_(dtype), residual_(static_cast<size_t>(n), 0.0f) {}

  void all_reduce_sum(std::span<float> gradient, Communicator& comm) override {
    check_size(gradient.size(), residual_.size());
    for (size_t i = 0; i < gradient.size(); ++i) gradient[i] += residual_[i];
    count_bytes(sum_.run(gradient, comm, residual_, "gradient chunks (narrow)"));
    ++calls_;
  }

  std::span<const float> residual() const override { return residual_; }
  std::vector<CodecState> save_state() const override {
    std::vector<CodecState> state = GradientCodec::save_state();
    state.push_back({"residual", residual_});
    return state;
  }
  void load_state(const std::vector<CodecState>& state) override {
    GradientCodec::load_state(state);
    residual_ = state_part(state, "residual", residual_.size());
  }

 private:
  WireSum sum_;
  std::vector<float> residual_;  // (n) what this rank's rounding dropped
};

}  // namespace

std::unique_ptr<GradientCodec> make_dense_codec(Compression kind, WireDtype dtype, int64_t n) {
  return std::make_unique<DenseCodec>(kind, dtype, n);
}

}  // namespace flotilla::comm::detail
