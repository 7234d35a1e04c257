// Deterministic data parallelism (`flotilla train --deterministic`): the same model bytes
// for any number of ranks, any split of the global batch into micro-batches and any thread
// count.
//
// Vocabulary:
//   row        one sequence of the global batch, the unit of work. The trainer runs forward
//              and backward one row at a time (batch 1), into a clean gradient buffer, with
//              the loss summed (not averaged) over the row's target tokens: a row's
//              gradient depends on that row alone, not on the rank or its neighbours.
//   limbs      a row's float32 gradient element g as the integer v = round(g * 2^48),
//              held as two int64: hi = floor(g * 2^16) and lo = v - hi * 2^32, in [0, 2^32].
//   accumulator  two limbs per element of the trainable arena; the rows a rank ran are
//              added into it in integers, and one all-reduce of int64 sums it over the
//              ranks. Integer addition is associative, so every rank ends with the same
//              bits whatever the number of ranks, the rows each ran, or the reduction's
//              algorithm and order. The sum goes back to float32 once (hi * 2^32 + lo as a
//              128-bit integer, correctly rounded to double, scaled, rounded to float).
//
// Why 2^48 and a 32-bit split. Resolution: each row's element is rounded to 2^-49
// absolute, so the global mean gradient (the sum over at most R rows divided by at least R
// target tokens) is off by at most 2^-49 ~ 1.8e-15 per element; AdamW's epsilon (1e-8) makes
// gradient elements below ~1e-12 irrelevant to the update. Range: a row's element must
// satisfy |g| <= 2^31 (so |hi| <= 2^47), and a global batch holds at most
// kMaxDeterministicRows = 2^15 rows, so the sums of hi stay below 2^62 and those of lo below
// 2^47: no overflow. An element outside the range (or not finite) is a non-finite step
// (the gradient reads NaN): --on-nonfinite stops or skips it as for any diverged step.
// The loss sum of a row goes the same way (one more pair of limbs), so the logged loss is
// identical too; the target-token count is an exact integer already. The squared gradient
// norm (for clipping) is an exact integer sum too: trunc(g^2 * 2^64) per element in 128
// bits, added over the ranks as limbs, so ZeRO's partition of it does not show either (a
// norm past 2^31 per element reads infinite: a non-finite step).
//
// With --zero 1 or 2 the chunks' limbs are reduce-scattered instead (ZeRO's cut of the
// arena, one unit), each rank converts and updates its shard, and the weights are
// all-gathered: the same bits as without ZeRO.
//
// Cost: the accumulator holds 16 bytes per trainable float, and one all-reduce of that size
// per step (4x float32's bytes), counted through comm/wire_bytes.hpp; plus folding each
// row's gradient into it. Batch-1 rows also make the matrix products narrower.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "flotilla/parallel/gradient_sync.hpp"

namespace flotilla::parallel {

inline constexpr int kFixedFractionBits = 48;      // v = round(x * 2^48)
inline constexpr double kFixedMaxMagnitude = 0x1p31;  // |x| of one row's element
inline constexpr int64_t kMaxDeterministicRows = int64_t{1} << 15;  // rows of one global batch

struct FixedLimbs {
  int64_t hi = 0;  // floor(x * 2^16)
  int64_t lo = 0;  // round(x * 2^48) - hi * 2^32, in [0, 2^32]
};

// x as limbs; false (and `out` untouched) when x is not finite or |x| > kFixedMaxMagnitude.
// The result depends on x alone (no rounding mode other than the default's nearest-even).
bool to_fixed(double x, FixedLimbs& out);
// hi * 2^-16 + lo * 2^-48, rounded once to double (exact below 2^53 units of 2^-48).
double from_fixed(int64_t hi, int64_t lo);

// Squared elements as trunc(g^2 * 2^56): resolution 2^-56 per element (a squared norm of
// n floats off by at most n * 2^-56: 2^-31 for 32M floats, nothing next to a clipping
// threshold near 1).
inline constexpr double kSquareScale = 0x1p56;

// The sum over `g` of trunc(g[i]^2 * 2^56), exact in 128-bit integers: the same for any
// thread count and, added over ranks, for any partition of the arena (g^2 of a float is
// exact in double). An element with |g| >= 2^17 (of the mean gradient: a diverged step),
// one not finite, or a sum past 2^118: nullopt, read as an infinite norm.
std::optional<__int128> fixed_sum_squares(std::span<const float> g);

// The deterministic mode over `dp` (null: one process, nothing exchanged, the same bits);
// `zero_stage` 1 or 2: AdamW's moments sharded as ZeRO shards them (the accumulator stays
// whole: stage 2 saves no gradient memory here), 0: every rank updates everything.
std::unique_ptr<GradientSync> make_deterministic_sync(model::Llama& model, DataParallel* dp, int zero_stage = 0);

}  // namespace flotilla::parallel
