#include "flotilla/parallel/deterministic_sync.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/wire_bytes.hpp"
#include "flotilla/parallel/chunk_cut.hpp"

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
constexpr double kSquareMax = 0x1p90;  // one element's scaled square: |g| < 2^17
constexpr int kSquareTotalBits = 118;  // one rank's sum: 3 limbs that add over 512 ranks
}  // namespace

std::optional<__int128> fixed_sum_squares(std::span<const float> g) {
  constexpr int64_t kChunks = 64;
  const auto n = static_cast<int64_t>(g.size());
  const int64_t chunk = (n + kChunks - 1) / kChunks;
  __int128 partial[kChunks] = {};
  bool bad[kChunks] = {};
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t c = 0; c < kChunks; ++c) {
    const int64_t lo = std::min(n, c * chunk), hi = std::min(n, lo + chunk);
    __int128 s = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const double x = static_cast<double>(g[static_cast<size_t>(i)]);
      const double q = x * x * kSquareScale;
      if (!(q < kSquareMax)) {  // NaN too
        bad[c] = true;
        continue;
      }
      s += q < 0x1p62 ? static_cast<__int128>(static_cast<int64_t>(q)) : static_cast<__int128>(q);
    }
    partial[c] = s;
  }
  __int128 total = 0;
  for (int64_t c = 0; c < kChunks; ++c) {
    if (bad[c]) return std::nullopt;
    total += partial[c];
  }
  if (total >= (__int128{1} << kSquareTotalBits)) return std::nullopt;
  return total;
}

namespace {

// Accumulator layout (int64): (hi, lo) per arena float, then the tail below. The tail sits
// right after the arena's limbs, so that ZeRO's all-reduce of the arena's tail takes it along.
enum Tail : int64_t { kLossHi, kLossLo, kTokens, kGradOutOfRange, kLossOutOfRange, kTailSize };

// What both deterministic modes share: the per-row fold into the accumulator, the loss
// and counts, the conversion back.
class RowAccumulator : public GradientSync {
 public:
  RowAccumulator(model::Llama& model, DataParallel* dp)
      : GradientSync(model), dp_(dp), n_(static_cast<int64_t>(model.trainable().params.size())),
        acc_(static_cast<size_t>(2 * n_ + kTailSize), 0) {}

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

  int64_t bytes_sent() const override { return bytes_sent_; }
  int64_t exchanges() const override { return exchanges_; }

 protected:
  // Arena floats [begin, end) from their summed limbs into out (end - begin), NaN when any
  // row's element was out of range.
  void convert(int64_t begin, int64_t end, float* out) const {
    const int64_t* acc = acc_.data();
    const bool ok = acc[2 * n_ + kGradOutOfRange] == 0;
    const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel for schedule(static) if (end - begin > (1 << 16))
    for (int64_t i = begin; i < end; ++i)
      out[i - begin] = ok ? static_cast<float>(from_fixed(acc[2 * i], acc[2 * i + 1])) : nan;
  }
  model::LossSum global_loss() const {
    const int64_t* tail = acc_.data() + 2 * n_;
    model::LossSum global;
    global.sum = tail[kLossOutOfRange] == 0 ? from_fixed(tail[kLossHi], tail[kLossLo])
                                            : std::numeric_limits<double>::quiet_NaN();
    global.num_tokens = tail[kTokens];
    return global;
  }
  // The squared norm of these floats and of the other ranks' (`over_ranks`): exact sums
  // of fixed-point squares, so the clipping factor is the same bits for any partition.
  double exact_sum_squares(std::span<const float> mine, bool over_ranks) {
    const std::optional<__int128> sum = fixed_sum_squares(mine);
    // v = hi 2^64 + mid 2^32 + lo, hi < 2^54: sums over ranks stay inside int64.
    std::array<int64_t, 4> limbs = {0, 0, 0, sum ? 0 : 1};
    if (sum) {
      limbs[0] = static_cast<int64_t>(*sum >> 64);
      limbs[1] = static_cast<int64_t>((*sum >> 32) & 0xffffffff);
      limbs[2] = static_cast<int64_t>(*sum & 0xffffffff);
    }
    if (over_ranks && dp_ && dp_->world() > 1)
      dp_->communicator().all_reduce(std::span<int64_t>(limbs), comm::ReduceOp::sum,
                                     comm::Options{.name = "deterministic gradient norm"});
    if (limbs[3] != 0) return std::numeric_limits<double>::infinity();
    const __int128 v = (static_cast<__int128>(limbs[0]) << 64) + (static_cast<__int128>(limbs[1]) << 32) +
                       static_cast<__int128>(limbs[2]);
    return static_cast<double>(v) / kSquareScale;
  }

  DataParallel* dp_;
  int64_t n_;                 // floats of the trainable arena
  std::vector<int64_t> acc_;  // (2 n + kTailSize) the accumulator
  int64_t bytes_sent_ = 0, exchanges_ = 0;
};

// Every rank ends with the whole summed gradient.
class DeterministicSync final : public RowAccumulator {
 public:
  using RowAccumulator::RowAccumulator;
  std::string name() const override { return "deterministic (fixed-point rows)"; }

  Exchanged exchange(const model::LossSum& /*local: summed per row in row_done*/) override {
    if (dp_ && dp_->world() > 1) {
      dp_->reducer().run(std::span<int64_t>(acc_), comm::ReduceOp::sum, comm::Options{.name = "deterministic grads"});
      bytes_sent_ += comm::ring_all_reduce_bytes(static_cast<int64_t>(acc_.size() * sizeof(int64_t)), dp_->world());
      ++exchanges_;
    }
    convert(0, n_, model_.trainable().grads.data());
    const model::LossSum global = global_loss();
    return {global, global.num_tokens};
  }
  double grad_sum_squares() override { return exact_sum_squares(model_.trainable().grads, false); }
};

// ZeRO-1/2 over the same accumulator: the arena is one unit cut as ZeRO cuts it
// (parallel/chunk_cut.hpp: rank r's chunk [r c, (r+1) c) with c = floor(n / N), the tail
// [N c, n) every rank's). The chunks' limbs are reduce-scattered, the tail's (with the loss
// and counts after it) all-reduced; each rank converts only what it owns and updates it
// with its shard of AdamW's moments; the updated chunks are all-gathered. The norm adds
// exact fixed-point squares over the ranks' sole-owned floats. Stage 2's saving of
// gradient memory does not apply: the accumulator is whole until the exchange.
class DeterministicZeroSync final : public RowAccumulator {
 public:
  DeterministicZeroSync(model::Llama& model, DataParallel& dp, int stage)
      : RowAccumulator(model, &dp), stage_(stage), world_(dp.world()), rank_(dp.rank()), cut_(0, n_, world_),
        chunk_(cut_.chunk), shard_(static_cast<size_t>(chunk_ + cut_.tail_size())) {}

  std::string name() const override { return fmt::format("deterministic (fixed-point rows), ZeRO-{}", stage_); }
  bool sharded() const override { return world_ > 1; }

  Exchanged exchange(const model::LossSum& /*local*/) override {
    const int64_t tail_begin = cut_.tail().begin;
    const std::span<int64_t> acc(acc_);
    if (world_ > 1) {
      if (chunk_ > 0) {
        dp_->reducer().reduce_scatter(acc.first(static_cast<size_t>(2 * tail_begin)), comm::ReduceOp::sum,
                                      comm::Options{.name = "deterministic gradient shards"});
        bytes_sent_ += comm::ring_reduce_scatter_bytes(2 * tail_begin * 8, static_cast<int>(world_));
      }
      const std::span<int64_t> rest = acc.subspan(static_cast<size_t>(2 * tail_begin));
      dp_->communicator().all_reduce(rest, comm::ReduceOp::sum, comm::Options{.name = "deterministic gradient tail"});
      bytes_sent_ += comm::ring_all_reduce_bytes(static_cast<int64_t>(rest.size()) * 8, static_cast<int>(world_));
      ++exchanges_;
    }
    convert(cut_.chunk_of(rank_).begin, cut_.chunk_of(rank_).end, shard_.data());
    convert(tail_begin, n_, shard_.data() + chunk_);
    const model::LossSum global = global_loss();
    return {global, global.num_tokens};
  }

  std::vector<ArenaRange> owned() const override {
    std::vector<ArenaRange> r;
    cut_.append_owned(r, rank_);
    return r;
  }
  std::vector<ArenaRange> sole_owned() const override {
    std::vector<ArenaRange> r;
    cut_.append_sole_owned(r, rank_);
    return r;
  }
  std::span<float> owned_grads() override { return shard_; }

  double grad_sum_squares() override {
    // Rank 0 counts the tail; every rank its chunk.
    const std::span<const float> all(shard_);
    if (rank_ == 0) return exact_sum_squares(all, true);
    return exact_sum_squares(all.first(static_cast<size_t>(chunk_)), true);
  }

  void after_update(int64_t, bool) override {
    if (world_ <= 1 || chunk_ == 0) return;
    dp_->reducer().all_gather(model_.trainable().params.first(static_cast<size_t>(chunk_ * world_)),
                              comm::Options{.name = "weight shards"});
    bytes_sent_ += comm::ring_all_gather_bytes(chunk_ * 4, static_cast<int>(world_));
  }

  void take_owned(std::span<const float> whole, std::span<float> owned) const override {
    if (owned.size() != shard_.size() || static_cast<int64_t>(whole.size()) != n_)
      throw Error("parallel", fmt::format("take_owned: a shard of {} floats and a whole of {} were given; this rank "
                                          "owns {} of {}",
                                          owned.size(), whole.size(), shard_.size(), n_));
    std::copy_n(whole.begin() + cut_.chunk_of(rank_).begin, chunk_, owned.begin());
    std::copy(whole.begin() + cut_.tail().begin, whole.end(), owned.begin() + chunk_);
  }

 private:
  const int stage_;
  const int64_t world_, rank_;
  const ChunkCut cut_;         // the whole arena [0, n) over the ranks (parallel/chunk_cut.hpp)
  const int64_t chunk_;        // c = floor(n / N)
  std::vector<float> shard_;   // (c + n - N c) this rank's chunk, then the tail
};

}  // namespace

std::unique_ptr<GradientSync> make_deterministic_sync(model::Llama& model, DataParallel* dp, int zero_stage) {
  if (zero_stage > 0 && dp) return std::make_unique<DeterministicZeroSync>(model, *dp, zero_stage);
  return std::make_unique<DeterministicSync>(model, dp);
}

}  // namespace flotilla::parallel
