// Deterministic data parallelism (`flotilla train --deterministic`): the same model bytes
// for any number of ranks, any split of the global batch into micro-batches and any thread
// count.
//
// Vocabulary:
//   row        one sequence of the global batch.
//   group      G consecutive rows of the global batch (`--deterministic-group`, default 1),
//              the unit of work: the trainer runs forward and backward on one group at a
//              time (batch G), into a clean gradient buffer, with the loss summed (not
//              averaged) over the group's target tokens. A group's gradient depends on its
//              rows and G alone, not on the rank or its neighbours: the products' sums run
//              in an order fixed by the shapes (the same on every rank) and, for the thread
//              counts tested, not by the threads (tests/dist/deterministic_test.py checks
//              1 and 2 threads at G = 1 and G = 4). G is part of what fixes the bytes; every
//              rank's micro-batch must be a whole number of groups.
//   fixed      a float32 gradient element g as the integer round(g * 2^48).
//   accumulator  per element of the trainable arena, v (int64: the sum of the groups'
//              fixed values this step) and hi (int64, an overflow limb, hi * 2^32 + v being
//              the exact sum; zero unless a block *spilled*: v's high part moved into hi
//              when a bound on |v| nears 2^62, or for a group element past 2^13). Integer
//              addition is associative, so after one all-reduce every rank holds the same
//              integers whatever the number of ranks, the groups each ran, or the
//              reduction's algorithm and order. The sum goes back to float32 once
//              (correctly rounded to double, scaled, rounded to float).
//   fold       adding a group's gradient into v: one pass, 4 bytes read and cleared and an
//              8-byte add per element, once per group (G rows), by blocks of 8192 elements
//              whose largest |g| bounds v.
//   narrow / wide  the exchange: when no rank spilled and every rank's bound keeps the sum
//              over the ranks below 2^62 (one 8-byte all-reduce agrees on it), v alone is
//              sent (8 bytes per float, 2x float32's); else each v is split into (hi, v in
//              [0, 2^32)) and both go (16 bytes). Either way the totals are the same exact
//              integers, so the bits are the same.
//
// Why 2^48. Resolution: each group's element is rounded to 2^-49 absolute, so the global
// mean gradient (the sum over at most R groups divided by at least R target tokens) is off by
// at most 2^-49 ~ 1.8e-15 per element; AdamW's epsilon (1e-8) makes gradient elements below
// ~1e-12 irrelevant to the update. Range: a group's element must satisfy |g| <= 2^31 (the
// slow fold's limbs: |hi| <= 2^47), and a global batch holds at most kMaxDeterministicRows =
// 2^15 rows, so the sums of hi stay below 2^62 and those of v (spilled) below 2^47: no
// overflow. An element outside the range (or not finite) is a non-finite step (the gradient
// reads NaN): --on-nonfinite stops or skips it as for any diverged step.
// The loss sum of a group goes as two limbs (FixedLimbs), so the logged loss is identical
// too; the target-token count is an exact integer already. The squared gradient
// norm (for clipping) is an exact integer sum too: trunc(g^2 * 2^56) per element in 128
// bits, added over the ranks as limbs, so ZeRO's partition of it does not show either (a
// norm past 2^17 per element reads infinite: a non-finite step).
//
// With --zero 1 or 2 the chunks of v (and hi, when wide) are reduce-scattered instead
// (ZeRO's cut of the arena, one unit), each rank converts and updates its shard, and the
// weights are all-gathered: the same bits as without ZeRO.
//
// Cost: the accumulator holds 16 bytes per trainable float (hi is rarely touched), one fold
// per group, and one all-reduce of 8 bytes per float per step (2x float32's), counted
// through comm/wire_bytes.hpp. With G = 1 the matrix products are one row wide; G >= 4
// makes them as wide as the default mode's on a small per-rank batch.
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
