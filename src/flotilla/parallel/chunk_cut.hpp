// The cut every ZeRO stage makes of a range of the flat arena over N ranks, written once.
//
// Vocabulary (the ZeRO files use these words): a range [begin, end) of n floats gives each
// rank a *chunk* of c = floor(n / N) floats, rank r's [begin + r c, begin + (r+1) c); the
// *tail* [begin + N c, end), fewer than N floats, is every rank's (all-reduced and updated
// alike everywhere), so no size needs to divide by N. What a rank *owns* is its chunk and
// the tail; what it *solely owns* is its chunk, and the tail on rank 0 only, so that every
// float is in exactly one rank's sole-owned ranges (a sharded checkpoint's rank files).
// Stages 1-2 cut their units this way (parallel/zero.cpp), stage 3 its groups
// (parallel/zero3.cpp), deterministic ZeRO the whole arena (parallel/deterministic_sync.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "flotilla/model/params.hpp"

namespace flotilla::parallel {

struct ChunkCut {
  int64_t begin = 0, end = 0;  // the range cut
  int64_t world = 1;           // N
  int64_t chunk = 0;           // c = floor((end - begin) / N)

  ChunkCut() = default;
  ChunkCut(int64_t begin_, int64_t end_, int64_t world_)
      : begin(begin_), end(end_), world(world_), chunk((end_ - begin_) / world_) {}

  // Rank r's chunk (empty when the range is shorter than the world).
  model::ElementRange chunk_of(int64_t rank) const { return {begin + rank * chunk, begin + (rank + 1) * chunk}; }
  // The chunks, [begin, begin + N c): what a reduce-scatter or all-gather moves.
  model::ElementRange chunks() const { return {begin, begin + world * chunk}; }
  // Every rank's: [begin + N c, end), possibly empty.
  model::ElementRange tail() const { return {begin + world * chunk, end}; }
  int64_t tail_size() const { return end - (begin + world * chunk); }

  // Appends what `rank` owns, ascending: its chunk, then the tail, each where not empty.
  void append_owned(std::vector<model::ElementRange>& out, int64_t rank) const {
    if (chunk > 0) out.push_back(chunk_of(rank));
    if (tail_size() > 0) out.push_back(tail());
  }
  // The same but the tail on rank 0 only.
  void append_sole_owned(std::vector<model::ElementRange>& out, int64_t rank) const {
    if (chunk > 0) out.push_back(chunk_of(rank));
    if (rank == 0 && tail_size() > 0) out.push_back(tail());
  }
};

}  // namespace flotilla::parallel
