#include "flotilla/data/rank_slice.hpp"

#include <cstring>

#include "flotilla/base/error.hpp"

namespace flotilla::data {

RankSlicedSource::RankSlicedSource(BatchSource& inner, int rank, int world)
    : inner_(inner), rank_(rank), world_(world) {
  if (world <= 0 || rank < 0 || rank >= world) throw Error("data/rank_slice", "rank outside the world");
}

void RankSlicedSource::next_batch(Batch& batch) {
  // One draw of world x B rows; rows [rank x B, (rank + 1) x B) are ours.
  scratch_.B = batch.B * world_;
  scratch_.T = batch.T;
  inner_.next_batch(scratch_);
  const auto begin = static_cast<std::ptrdiff_t>(rank_ * batch.B * batch.T);
  const auto count = static_cast<std::ptrdiff_t>(batch.B * batch.T);
  batch.tokens.assign(scratch_.tokens.begin() + begin, scratch_.tokens.begin() + begin + count);
  batch.targets.assign(scratch_.targets.begin() + begin, scratch_.targets.begin() + begin + count);
  if (scratch_.doc_start.empty())
    batch.doc_start.clear();
  else
    batch.doc_start.assign(scratch_.doc_start.begin() + begin, scratch_.doc_start.begin() + begin + count);
}

void RankSlicedSource::next_batch(int32_t* tokens, int32_t* targets, int B, int T) {
  Batch batch;
  batch.B = B;
  batch.T = T;
  next_batch(batch);
  std::memcpy(tokens, batch.tokens.data(), batch.tokens.size() * sizeof(int32_t));
  std::memcpy(targets, batch.targets.data(), batch.targets.size() * sizeof(int32_t));
}

}  // namespace flotilla::data
