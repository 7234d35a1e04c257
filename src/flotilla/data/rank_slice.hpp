// Rank slicing for sources that know nothing of ranks (the raw-text windows): every rank
// draws the same world x B rows from the same seed and keeps its own B, so the union over
// ranks of one micro-step is the micro-batch a single process with world x B rows draws.
// Drawing rows is cheap next to computing on them. (BatchSampler slices by itself.)
#pragma once

#include <memory>

#include "flotilla/data/text_dataset.hpp"

namespace flotilla::data {

class RankSlicedSource final : public BatchSource {
 public:
  // `inner` must outlive this. rank in [0, world).
  RankSlicedSource(BatchSource& inner, int rank, int world);
  void next_batch(Batch& batch) override;
  void next_batch(int32_t* tokens, int32_t* targets, int B, int T) override;
  nlohmann::json state() const override { return inner_.state(); }
  void set_state(const nlohmann::json& state) override { inner_.set_state(state); }

 private:
  BatchSource& inner_;
  int rank_, world_;
  Batch scratch_;
};

}  // namespace flotilla::data
