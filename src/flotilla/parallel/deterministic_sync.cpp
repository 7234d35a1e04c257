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

// The accumulator (int64), planar: [ v (n) | tail | hi (n) ].
//   v     per arena float, the sum of its groups' round(g * 2^48) in one int64 while that
//         cannot overflow (the fast path: one 8-byte add per element and group);
//   hi    per arena float, the overflow limb: a *spill* moves floor(v / 2^32) of a block
//         into hi (v keeps the rest, in [0, 2^32)), so hi * 2^32 + v stays the exact sum.
//         Zero unless a block spilled this step (a group's element past kFastMagnitude, or
//         many large groups), so it is rarely touched.
// The tail sits right after v, so that one all-reduce of v takes it along (and ZeRO's
// all-reduce of the arena's tail).
enum Tail : int64_t { kLossHi, kLossLo, kTokens, kGradOutOfRange, kLossOutOfRange, kTailSize };

// Elements per block: the unit of the fold's bound and spill (8 KiB of v and 4 KiB of the
// gradient: in cache between the fold's two passes over it; small enough that an embedding's
// untouched rows make whole blocks of zeros, skipped).
constexpr int64_t kFoldBlock = 1024;
// One group's element past this goes the slow way (to_fixed into hi and v); below it,
// round(g * 2^48) < 2^62 fits an int64.
constexpr double kFastMagnitude = 0x1p13;
// A block's v may grow to sums of magnitude below 2^14 (|v| < 2^62): its bound (the sum of
// its groups' largest |g|) past this spills it first.
constexpr double kBlockBound = 0x1p14;
constexpr int64_t kLowMask = 0xffffffff;

// What both deterministic modes share: the per-group fold into the accumulator, the loss
// and counts, the exchange's agreement on the accumulator's width, the conversion back.
class RowAccumulator : public GradientSync {
 public:
  RowAccumulator(model::Llama& model, DataParallel* dp)
      : GradientSync(model), dp_(dp), n_(static_cast<int64_t>(model.trainable().params.size())),
        blocks_((n_ + kFoldBlock - 1) / kFoldBlock), acc_(static_cast<size_t>(2 * n_ + kTailSize), 0),
        bound_(static_cast<size_t>(blocks_), 0.0) {}

  bool per_row() const override { return true; }

  void zero_grads() override {
    model_.zero_grads();
    // v is written, not added to, by the step's first fold (or zeroed at the exchange when
    // no group had a target token); hi is zero unless a block spilled.
    if (spilled_) std::fill(hi(), hi() + n_, int64_t{0});
    std::fill(tail(), tail() + kTailSize, int64_t{0});
    spilled_ = false;
    first_fold_ = true;
  }

  // Folds the group's gradient into the accumulator and leaves the model's buffer clean for
  // the next group. Element-wise in integers (exact): the same for any thread count.
  void row_done(const model::LossSum& group) override {
    float* g = model_.trainable().grads.data();
    int64_t out_of_range = 0;
    bool spilled = false;
#pragma omp parallel for schedule(static) reduction(+ : out_of_range) reduction(|| : spilled) if (n_ > (1 << 16))
    for (int64_t b = 0; b < blocks_; ++b) {
      const int64_t i0 = b * kFoldBlock, i1 = std::min(n_, i0 + kFoldBlock);
      float m = 0.0f;
      bool finite = true;
      for (int64_t i = i0; i < i1; ++i) {
        const float a = std::fabs(g[i]);
        m = std::max(m, a);
        finite &= a <= std::numeric_limits<float>::max();
      }
      int64_t* v = acc_.data();
      if (first_fold_) {
        if (finite && m < kFastMagnitude) {
          for (int64_t i = i0; i < i1; ++i) v[i] = fast_fixed(g[i]);
          if (m > 0.0f) std::fill(g + i0, g + i1, 0.0f);
          bound_[static_cast<size_t>(b)] = m;
          continue;
        }
        std::fill(v + i0, v + i1, int64_t{0});
        bound_[static_cast<size_t>(b)] = 0.0;
      }
      double& bound = bound_[static_cast<size_t>(b)];
      if (!(finite && m < kFastMagnitude)) {
        spill(i0, i1);
        spilled = true;
        out_of_range += slow_fold(g, i0, i1);
        bound = 0x1p-15;  // v in [0, 2^33): the spill's rest and a limb in [0, 2^32]
        continue;
      }
      if (bound + static_cast<double>(m) >= kBlockBound) {
        spill(i0, i1);
        spilled = true;
        bound = 0x1p-16;
      }
      if (m == 0.0f) continue;  // nothing to add, nothing to clear
      bound += static_cast<double>(m);
      // Zeros skipped: an embedding's gradient is zero but for the group's tokens' rows,
      // whose cache lines the fold then never touches.
      for (int64_t i = i0; i < i1; ++i) {
        const float x = g[i];
        if (x == 0.0f) continue;
        v[i] += fast_fixed(x);
        g[i] = 0.0f;
      }
    }
    first_fold_ = false;
    spilled_ = spilled_ || spilled;
    int64_t* t = tail();
    t[kGradOutOfRange] += out_of_range;
    FixedLimbs l;
    if (to_fixed(group.sum, l)) {
      t[kLossHi] += l.hi;
      t[kLossLo] += l.lo;
    } else {
      ++t[kLossOutOfRange];
    }
    t[kTokens] += group.num_tokens;
  }

  int64_t bytes_sent() const override { return bytes_sent_; }
  int64_t exchanges() const override { return exchanges_; }

 protected:
  int64_t* v() { return acc_.data(); }
  int64_t* tail() { return acc_.data() + n_; }
  int64_t* hi() { return acc_.data() + n_ + kTailSize; }
  const int64_t* tail() const { return acc_.data() + n_; }

  // round(x * 2^48) for |x| < kFastMagnitude (x * 2^48 is exact in double; the rounding is
  // nearest-even, as to_fixed's).
  static int64_t fast_fixed(float x) { return static_cast<int64_t>(std::nearbyint(static_cast<double>(x) * 0x1p48)); }

  // v's high part of [i0, i1) into hi: hi * 2^32 + v unchanged, v in [0, 2^32) after.
  void spill(int64_t i0, int64_t i1) {
    int64_t* v = acc_.data();
    int64_t* h = hi();
    for (int64_t i = i0; i < i1; ++i) {
      h[i] += v[i] >> 32;  // arithmetic shift: floor
      v[i] &= kLowMask;
    }
  }

  // Elements [i0, i1) of g by to_fixed's two limbs (any |x| <= 2^31), the buffer cleared;
  // returns how many were out of range.
  int64_t slow_fold(float* g, int64_t i0, int64_t i1) {
    int64_t* v = acc_.data();
    int64_t* h = hi();
    int64_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const float x = g[i];
      g[i] = 0.0f;
      FixedLimbs l;
      if (!to_fixed(x, l)) {
        ++bad;
        continue;
      }
      h[i] += l.hi;
      v[i] += l.lo;
    }
    return bad;
  }

  // Before the exchange: v zeroed if no group was folded; then whether this exchange may
  // send v alone. Every rank's v must sum over the ranks without overflow and no rank may
  // have spilled: one tiny all-reduce agrees on it, so every rank takes the same path. The
  // wide path first splits each v into (hi, v in [0, 2^32)) and sends both; either way the
  // integer sums are the exact totals, so the bits after convert() are the same.
  bool agree_narrow() {
    if (first_fold_) {
      std::fill(v(), v() + n_, int64_t{0});
      std::fill(bound_.begin(), bound_.end(), 0.0);
      first_fold_ = false;
    }
    const int64_t world = dp_ ? dp_->world() : 1;
    double largest = 0.0;
    for (const double b : bound_) largest = std::max(largest, b);
    std::array<int64_t, 1> wide = {spilled_ || largest * static_cast<double>(world) >= 0x1p14 ? 1 : 0};
    if (world > 1)
      dp_->communicator().all_reduce(std::span<int64_t>(wide), comm::ReduceOp::sum,
                                     comm::Options{.name = "deterministic accumulator width"});
    if (wide[0] == 0) return true;
    if (!spilled_) std::fill(hi(), hi() + n_, int64_t{0});
    spilled_ = true;  // hi is in use: zeroed at the next step
#pragma omp parallel for schedule(static) if (n_ > (1 << 16))
    for (int64_t b = 0; b < blocks_; ++b) spill(b * kFoldBlock, std::min(n_, (b + 1) * kFoldBlock));
    return false;
  }

  // Arena floats [begin, end) from their summed integers into out (end - begin), NaN when
  // any group's element was out of range. `narrow`: v holds the whole sum.
  void convert(int64_t begin, int64_t end, float* out, bool narrow) {
    const int64_t* v = acc_.data();
    const int64_t* h = hi();
    const bool ok = tail()[kGradOutOfRange] == 0;
    const float nan = std::numeric_limits<float>::quiet_NaN();
#pragma omp parallel for schedule(static) if (end - begin > (1 << 16))
    for (int64_t i = begin; i < end; ++i) {
      // An int64 and an __int128 of the same value round to the same double.
      const double x = narrow ? static_cast<double>(v[i]) * 0x1p-48 : from_fixed(h[i], v[i]);
      out[i - begin] = ok ? static_cast<float>(x) : nan;
    }
  }
  model::LossSum global_loss() const {
    const int64_t* t = tail();
    model::LossSum global;
    global.sum = t[kLossOutOfRange] == 0 ? from_fixed(t[kLossHi], t[kLossLo]) : std::numeric_limits<double>::quiet_NaN();
    global.num_tokens = t[kTokens];
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
  int64_t blocks_;            // ceil(n / kFoldBlock)
  std::vector<int64_t> acc_;  // (2 n + kTailSize) the accumulator: v, tail, hi
  std::vector<double> bound_;  // (blocks) per block, a bound on |v| * 2^-48 since its last spill
  bool spilled_ = false;      // hi is in use this step
  bool first_fold_ = true;    // no group folded yet this step: v holds the last step's
  int64_t bytes_sent_ = 0, exchanges_ = 0;
};

// Every rank ends with the whole summed gradient.
class DeterministicSync final : public RowAccumulator {
 public:
  using RowAccumulator::RowAccumulator;
  std::string name() const override { return "deterministic (fixed-point rows)"; }

  Exchanged exchange(const model::LossSum& /*local: summed per group in row_done*/) override {
    const bool narrow = agree_narrow();
    if (dp_ && dp_->world() > 1) {
      // v and the tail; hi too when wide.
      const std::span<int64_t> acc(acc_);
      for (const std::span<int64_t> part : {acc.first(static_cast<size_t>(n_ + kTailSize)),
                                            acc.subspan(static_cast<size_t>(n_ + kTailSize))}) {
        if (narrow && part.data() == hi()) break;
        dp_->reducer().run(part, comm::ReduceOp::sum, comm::Options{.name = "deterministic grads"});
        bytes_sent_ += comm::ring_all_reduce_bytes(static_cast<int64_t>(part.size() * sizeof(int64_t)), dp_->world());
      }
      ++exchanges_;
    }
    convert(0, n_, model_.trainable().grads.data(), narrow);
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
    const bool narrow = agree_narrow();
    const std::span<int64_t> acc(acc_);
    if (world_ > 1) {
      // v's chunks reduce-scattered, v's tail with the accumulator's tail all-reduced; hi
      // the same way when wide.
      const std::span<int64_t> v = acc.first(static_cast<size_t>(n_ + kTailSize));
      const std::span<int64_t> h = acc.subspan(static_cast<size_t>(n_ + kTailSize));
      for (const std::span<int64_t> part : {v, h}) {
        if (narrow && part.data() == h.data()) break;
        if (chunk_ > 0) {
          dp_->reducer().reduce_scatter(part.first(static_cast<size_t>(tail_begin)), comm::ReduceOp::sum,
                                        comm::Options{.name = "deterministic gradient shards"});
          bytes_sent_ += comm::ring_reduce_scatter_bytes(tail_begin * 8, static_cast<int>(world_));
        }
        const std::span<int64_t> rest = part.subspan(static_cast<size_t>(tail_begin));
        dp_->communicator().all_reduce(rest, comm::ReduceOp::sum, comm::Options{.name = "deterministic gradient tail"});
        bytes_sent_ += comm::ring_all_reduce_bytes(static_cast<int64_t>(rest.size()) * 8, static_cast<int>(world_));
      }
      ++exchanges_;
    }
    convert(cut_.chunk_of(rank_).begin, cut_.chunk_of(rank_).end, shard_.data(), narrow);
    convert(tail_begin, n_, shard_.data() + chunk_, narrow);
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
