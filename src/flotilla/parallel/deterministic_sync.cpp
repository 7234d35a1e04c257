#include "flotilla/parallel/deterministic_sync.hpp"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <vector>

#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::parallel {

bool to_fixed(double x, FixedLimbs& out) {
  if (!(std::fabs(x) <= kFixedMaxMagnitude)) return false;  // NaN fails too
  // Scaling by powers of two is exact in double for a float32 (or a loss sum) in range.
  const double high = x * 0x1p16;
  const double floor_high = std::floor(high);
  // The fraction is in [0, 1); times 2^32 it is exact, then rounded to nearest-even. For a
  // tiny negative x the fraction itself rounds up to 1 and lo reads 2^32 (carry): the
  // value is still round(x * 2^48), to within far less than a unit.
  const double low = std::nearbyint((high - floor_high) * 0x1p32);
  out.hi = static_cast<int64_t>(floor_high);
  out.lo = static_cast<int64_t>(low);
  return true;
}

double from_fixed(int64_t hi, int64_t lo) {
  const __int128 v = static_cast<__int128>(hi) * (__int128{1} << 32) + static_cast<__int128>(lo);
  return static_cast<double>(v) * 0x1p-48;
}

namespace {

// Accumulator layout (int64): (hi, lo) per arena float, then the tail below; one all-reduce.
enum Tail : int64_t { kLossHi, kLossLo, kTokens, kGradOutOfRange, kLossOutOfRange, kTailSize };

class DeterministicSync final : public GradientSync {
 public:
  DeterministicSync(model::Llama& model, DataParallel* dp)
      : GradientSync(model), dp_(dp), n_(static_cast<int64_t>(model.trainable().params.size())),
        acc_(static_cast<size_t>(2 * n_ + kTailSize), 0) {}

  std::string name() const override { return "deterministic (fixed-point rows)"; }
  bool per_row() const override { return true; }

  void zero_grads() override {
    model_.zero_grads();
    std::fill(acc_.begin(), acc_.end(), 0);
  }

  // Folds the row's gradient into the accumulator and leaves the model's buffer clean for
  // the next row. Element-wise: the same for any thread count.
  void row_done(const model::LossSum& row) override {
    const std::span<float> g = model_.trainable().grads;
    int64_t* acc = acc_.data();
    int64_t out_of_range = 0;
#pragma omp parallel for schedule(static) reduction(+ : out_of_range) if (n_ > (1 << 16))
    for (int64_t i = 0; i < n_; ++i) {
      const float x = g[i];
      if (x == 0.0f) continue;
      g[i] = 0.0f;
      FixedLimbs l;
      if (!to_fixed(x, l)) {
        ++out_of_range;
        continue;
      }
      acc[2 * i] += l.hi;
      acc[2 * i + 1] += l.lo;
    }
    int64_t* tail = acc + 2 * n_;
    tail[kGradOutOfRange] += out_of_range;
    FixedLimbs l;
    if (to_fixed(row.sum, l)) {
      tail[kLossHi] += l.hi;
      tail[kLossLo] += l.lo;
    } else {
      ++tail[kLossOutOfRange];
    }
    tail[kTokens] += row.num_tokens;
  }

  Exchanged exchange(const model::LossSum& /*local: summed per row in row_done*/) override {
    if (dp_ && dp_->world() > 1) {
      dp_->reducer().run(std::span<int64_t>(acc_), comm::ReduceOp::sum, comm::Options{.name = "deterministic grads"});
      bytes_sent_ += comm::ring_all_reduce_bytes(static_cast<int64_t>(acc_.size() * sizeof(int64_t)), dp_->world());
      ++exchanges_;
    }
    const std::span<float> g = model_.trainable().grads;
    const int64_t* acc = acc_.data();
    const int64_t* tail = acc + 2 * n_;
    const bool grads_ok = tail[kGradOutOfRange] == 0;
    const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel for schedule(static) if (n_ > (1 << 16))
    for (int64_t i = 0; i < n_; ++i)
      g[i] = grads_ok ? static_cast<float>(from_fixed(acc[2 * i], acc[2 * i + 1])) : nan;
    model::LossSum global;
    global.sum = tail[kLossOutOfRange] == 0 ? from_fixed(tail[kLossHi], tail[kLossLo])
                                            : std::numeric_limits<double>::quiet_NaN();
    global.num_tokens = tail[kTokens];
    return {global, global.num_tokens};
  }

  int64_t bytes_sent() const override { return bytes_sent_; }
  int64_t exchanges() const override { return exchanges_; }

 private:
  DataParallel* dp_;
  int64_t n_;                 // floats of the trainable arena
  std::vector<int64_t> acc_;  // (2 n + kTailSize) the accumulator
  int64_t bytes_sent_ = 0, exchanges_ = 0;
};

}  // namespace

std::unique_ptr<GradientSync> make_deterministic_sync(model::Llama& model, DataParallel* dp) {
  return std::make_unique<DeterministicSync>(model, dp);
}

}  // namespace flotilla::parallel
