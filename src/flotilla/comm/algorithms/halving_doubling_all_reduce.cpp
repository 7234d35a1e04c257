// Recursive halving-doubling all-reduce (Rabenseifner's algorithm), for small messages:
// 2 log2(p) steps, each a pairwise exchange, instead of the ring's 2(p-1).
//
// Vocabulary. The *core* is the largest power of two q <= p ranks; the rem = p - q
// *extra* ranks fold in first. A core rank has a *virtual rank* v in [0, q); its
// partner at the step with bit `mask` is v ^ mask. Its *range* is the slice of the
// buffer it is responsible for; it halves at every step of the reduce-scatter and
// doubles back in the all-gather.
//
//   fold:      among ranks 0..2 rem-1, each even rank sends its whole buffer to the odd
//              rank above it, which adds it and takes part as v = r/2; the even ranks
//              wait. Ranks >= 2 rem are v = r - rem.
//   halving:   mask = q/2, q/4, .., 1: split the range at its middle; the rank whose v has
//              the bit clear keeps the lower half. Send the other half to the partner,
//              receive the partner's copy of ours, add it.
//   doubling:  mask = 1, 2, .., q/2: send our range, receive the partner's (its sibling
//              in the range we had before the matching halving step): the range doubles.
//   unfold:    each odd rank below 2 rem sends the result to the even rank below it.
//
// Tiny buffers (up to kWholeBufferBytes) skip the halving: each step of the doubling then
// exchanges the whole buffer and adds the partner's (recursive doubling), log2(q) round
// trips instead of 2 log2(q), where a round trip costs more than the bytes. Partners
// hold equal values at every step and add commutatively, so every rank still ends with
// identical bits.
//
// With fewer elements than ranks some ranges are empty; both partners compute the same
// split, so an empty range is an empty message on both sides. Each element is reduced on
// exactly one core rank, so every rank ends with identical bits.
#include <vector>

#include "flotilla/comm/algorithms/payload.hpp"

namespace flotilla::comm {
namespace detail {

constexpr size_t kWholeBufferBytes = 8 << 10;

void halving_doubling_payload(Communicator& comm, MutView data, ReduceOp op,
                              const AlgorithmOptions& tuning, Clock::time_point deadline) {
  const int p = comm.size(), r = comm.rank(), tag = tuning.tag;
  if (p == 1 || data.count() == 0) return;
  const size_t n = data.count(), element_bytes = element_size(data.type());
  int q = 1;
  while (q * 2 <= p) q *= 2;
  const int rem = p - q;
  auto real_rank = [&](int v) { return v < rem ? 2 * v + 1 : v + rem; };
  // (n): the fold and the whole-buffer mode; the halving needs (n/2) at most.
  std::vector<std::byte> own;
  std::byte* scratch = scratch_bytes(tuning, own, n * element_bytes);
  auto scratch_view = [&](size_t count) {
    return MutView(std::span<std::byte>(scratch, count * element_bytes), data.type(), count);
  };

  // Fold.
  int v = -1;
  if (r < 2 * rem) {
    if (r % 2 == 0) {
      Request s = comm.isend(ConstView(data), r + 1, tag);
      wait_until(s, deadline);
    } else {
      MutView in = scratch_view(n);
      Request q_recv = comm.irecv(in, r - 1, tag);
      wait_until(q_recv, deadline);
      reduce_into(data.type(), op, data.data(), in.data(), n);
      v = r / 2;
    }
  } else {
    v = r - rem;
  }

  if (v >= 0 && n * element_bytes <= kWholeBufferBytes) {
    MutView in = scratch_view(n);
    for (int mask = 1; mask < q; mask *= 2) {
      const int partner = real_rank(v ^ mask);
      Request transfers[2] = {comm.irecv(in, partner, tag),
                              comm.isend(ConstView(data), partner, tag)};
      wait_all_until(transfers, deadline);
      reduce_into(data.type(), op, data.data(), in.data(), n);
    }
  } else if (v >= 0) {
    // Halving: (range before the step) per step, for the doubling to retrace.
    std::vector<Slice> parents;
    Slice range{0, n};
    for (int mask = q / 2; mask > 0; mask /= 2) {
      const int partner = real_rank(v ^ mask);
      const Slice lower{range.begin, range.count / 2};
      const Slice upper{range.begin + lower.count, range.count - lower.count};
      const bool keep_lower = (v & mask) == 0;
      const Slice keep = keep_lower ? lower : upper, give = keep_lower ? upper : lower;
      MutView in = scratch_view(keep.count);
      Request transfers[2] = {comm.irecv(in, partner, tag),
                              comm.isend(ConstView(sub_view(data, give)), partner, tag)};
      wait_all_until(transfers, deadline);
      reduce_into(data.type(), op, data.data() + keep.begin * element_bytes, in.data(),
                  keep.count);
      parents.push_back(range);
      range = keep;
    }
    // Doubling.
    for (int mask = 1; mask < q; mask *= 2) {
      const int partner = real_rank(v ^ mask);
      const Slice parent = parents.back();
      parents.pop_back();
      const Slice theirs = range.begin == parent.begin
                               ? Slice{range.begin + range.count, parent.count - range.count}
                               : Slice{parent.begin, parent.count - range.count};
      Request transfers[2] = {comm.irecv(sub_view(data, theirs), partner, tag),
                              comm.isend(ConstView(sub_view(data, range)), partner, tag)};
      wait_all_until(transfers, deadline);
      range = parent;
    }
  }

  // Unfold.
  if (r < 2 * rem) {
    Request t = r % 2 == 0 ? comm.irecv(data, r + 1, tag) : comm.isend(ConstView(data), r - 1, tag);
    wait_until(t, deadline);
  }
}

}  // namespace detail

void halving_doubling_all_reduce(Communicator& comm, MutView data, ReduceOp op,
                                 const Options& options, const AlgorithmOptions& tuning) {
  detail::run_signed(comm, "hd", data, op, options,
                     [&](ReduceOp base, Clock::time_point deadline) {
                       detail::halving_doubling_payload(comm, data, base, tuning, deadline);
                     });
}

}  // namespace flotilla::comm
