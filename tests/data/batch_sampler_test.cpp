// The batch sampler: the same global batches for any world size, disjoint rank slices,
// packing that never crosses an example's boundary, and exact resume.
#include "flotilla/data/batch_sampler.hpp"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "../test_seed.hpp"

namespace flotilla::data {
namespace {

// Examples held in vectors; example i's tokens are all 1000 * (i + 1) + position, so any
// token tells which example and position it came from.
class VectorExamples final : public ExampleSource {
 public:
  VectorExamples(const std::vector<size_t>& lengths, uint64_t mask_seed) {
    Rng rng(mask_seed);
    for (size_t i = 0; i < lengths.size(); ++i) {
      std::vector<uint32_t> toks;
      std::vector<uint8_t> bits((lengths[i] + 7) / 8, 0);
      for (size_t p = 0; p < lengths[i]; ++p) {
        toks.push_back(static_cast<uint32_t>(1000 * (i + 1) + p));
        if (rng.below(4) != 0) bits[p / 8] |= static_cast<uint8_t>(1u << (p % 8));  // 3/4 in the loss
      }
      tokens_.push_back(std::move(toks));
      bits_.push_back(std::move(bits));
    }
  }
  size_t num_examples() const override { return tokens_.size(); }
  ExampleView example(size_t i) const override {
    return ExampleView{tokens_[i], LossMaskView(bits_[i].data(), 0, tokens_[i].size())};
  }

 private:
  std::vector<std::vector<uint32_t>> tokens_;
  std::vector<std::vector<uint8_t>> bits_;
};

std::vector<size_t> random_lengths(Rng& rng, size_t n, size_t max_len) {
  std::vector<size_t> lengths;
  for (size_t i = 0; i < n; ++i) lengths.push_back(1 + rng.below(max_len));
  return lengths;
}

uint64_t fresh_seed() { return ::flotilla::testing::test_seed(); }

// The rows of `steps` global batches, assembled from every rank's micro-batches.
std::vector<std::vector<int32_t>> global_rows(const ExampleSource& ex, SamplerConfig cfg, int steps) {
  const int64_t G = cfg.global_rows(), T = cfg.seq_len;
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(steps * G));
  for (int r = 0; r < cfg.world; ++r) {
    SamplerConfig rc = cfg;
    rc.rank = r;
    BatchSampler sampler(ex, rc);
    for (int s = 0; s < steps; ++s) {
      for (int64_t a = 0; a < cfg.grad_accum; ++a) {
        Batch b;
        sampler.next_batch(b);
        for (int64_t i = 0; i < cfg.micro_batch; ++i) {
          const int64_t row = s * G + (a * cfg.world + r) * cfg.micro_batch + i;
          auto& out = rows[static_cast<size_t>(row)];
          out.assign(b.tokens.begin() + i * T, b.tokens.begin() + (i + 1) * T);
          out.insert(out.end(), b.targets.begin() + i * T, b.targets.begin() + (i + 1) * T);
          out.insert(out.end(), b.doc_start.begin() + i * T, b.doc_start.begin() + (i + 1) * T);
        }
      }
    }
  }
  return rows;
}

TEST(BatchSampler, PackingASplitOfEmptyExamplesIsAnErrorNotAnEndlessLoop) {
  const VectorExamples empty({0, 0, 0}, fresh_seed());
  SamplerConfig cfg;
  cfg.seq_len = 8;
  cfg.micro_batch = 2;
  cfg.pack = true;
  cfg.repeat = true;
  BatchSampler sampler(empty, cfg);
  Batch b;
  EXPECT_THROW(sampler.next_batch(b), InputError);
}

TEST(BatchSampler, SameGlobalBatchesOnOneTwoAndFourRanks) {
  const uint64_t seed = fresh_seed();
  Rng rng(seed);
  const VectorExamples ex(random_lengths(rng, 57, 40), seed);
  for (bool pack : {false, true}) {
    SamplerConfig one{.seq_len = 32, .micro_batch = 4, .grad_accum = 2, .world = 1, .pack = pack, .seed = seed};
    SamplerConfig two = one, four = one;
    two.micro_batch = 2;
    two.world = 2;
    four.micro_batch = 2;
    four.grad_accum = 1;
    four.world = 4;
    const auto ref = global_rows(ex, one, 12);  // 12 steps x 8 rows: past one epoch
    EXPECT_EQ(global_rows(ex, two, 12), ref) << "pack " << pack;
    EXPECT_EQ(global_rows(ex, four, 12), ref) << "pack " << pack;
  }
}

TEST(BatchSampler, RanksGetDisjointSlicesThatCoverTheEpoch) {
  const uint64_t seed = fresh_seed();
  Rng rng(seed);
  const VectorExamples ex(random_lengths(rng, 48, 16), seed);
  // Padding mode: one example per row, 48 examples = 6 global batches of 8 rows.
  SamplerConfig cfg{.seq_len = 16, .micro_batch = 2, .grad_accum = 2, .world = 2, .pack = false, .seed = seed};
  std::multiset<uint32_t> seen;
  for (int r = 0; r < 2; ++r) {
    cfg.rank = r;
    BatchSampler sampler(ex, cfg);
    for (int i = 0; i < 6 * 2; ++i) {
      Batch b;
      sampler.next_batch(b);
      for (int64_t row = 0; row < b.B; ++row) seen.insert(static_cast<uint32_t>(b.tokens[static_cast<size_t>(row * b.T)]) / 1000);
    }
  }
  ASSERT_EQ(seen.size(), 48u);
  for (uint32_t i = 1; i <= 48; ++i) EXPECT_EQ(seen.count(i), 1u) << "example " << i - 1;
}

TEST(BatchSampler, ShuffleDependsOnSeedAndEpoch) {
  const VectorExamples ex(std::vector<size_t>(40, 3), 1);
  auto first_tokens = [&](uint64_t seed, int skip_steps) {
    SamplerConfig cfg{.seq_len = 3, .micro_batch = 40, .grad_accum = 1, .pack = false, .seed = seed};
    BatchSampler sampler(ex, cfg);
    Batch b;
    for (int i = 0; i <= skip_steps; ++i) sampler.next_batch(b);
    std::vector<int32_t> firsts;
    for (int64_t r = 0; r < b.B; ++r) firsts.push_back(b.tokens[static_cast<size_t>(r * b.T)]);
    return firsts;
  };
  EXPECT_EQ(first_tokens(5, 0), first_tokens(5, 0));
  EXPECT_NE(first_tokens(5, 0), first_tokens(6, 0));
  EXPECT_NE(first_tokens(5, 0), first_tokens(5, 1));  // epoch 1's order differs from epoch 0's
}

TEST(BatchSampler, PackedRowsKeepTargetsInsideTheirExample) {
  const uint64_t seed = fresh_seed();
  Rng rng(seed);
  const VectorExamples ex(random_lengths(rng, 30, 20), seed);
  SamplerConfig cfg{.seq_len = 24, .micro_batch = 3, .grad_accum = 1, .pack = true, .seed = seed};
  BatchSampler sampler(ex, cfg);
  int packed_rows = 0;
  for (int step = 0; step < 10; ++step) {
    Batch b;
    sampler.next_batch(b);
    for (int64_t r = 0; r < b.B; ++r) {
      int examples_in_row = 0;
      for (int64_t t = 0; t < b.T; ++t) {
        const auto i = static_cast<size_t>(r * b.T + t);
        const int32_t start = b.doc_start[i];
        ASSERT_LE(start, t);
        if (start == t) ++examples_in_row;
        if (b.targets[i] == -100) continue;
        // A target is the next token of the same example: same example id, next position.
        EXPECT_EQ(b.targets[i] / 1000, b.tokens[i] / 1000) << "target crosses an example boundary";
        EXPECT_EQ(b.targets[i], b.tokens[i] + 1);
        ASSERT_LT(t + 1, b.T);
        EXPECT_EQ(b.doc_start[i + 1], start) << "the target's position belongs to another example";
      }
      if (examples_in_row > 1) ++packed_rows;
    }
  }
  EXPECT_GT(packed_rows, 0) << "packing never put two examples in a row";
}

TEST(BatchSampler, LossMaskAndPaddingDecideTheTargets) {
  const VectorExamples ex({5, 3}, 77);
  SamplerConfig cfg{.seq_len = 8, .micro_batch = 2, .grad_accum = 1, .pack = false, .shuffle = false, .seed = 0};
  BatchSampler sampler(ex, cfg);
  Batch b;
  sampler.next_batch(b);
  for (size_t e = 0; e < 2; ++e) {
    const ExampleView view = ex.example(e);
    for (size_t t = 0; t < 8; ++t) {
      const int32_t target = b.targets[e * 8 + t];
      const bool in_loss = t + 1 < view.tokens.size() && view.mask[t + 1];
      EXPECT_EQ(target, in_loss ? static_cast<int32_t>(view.tokens[t + 1]) : -100) << "example " << e << " pos " << t;
    }
  }
}

TEST(BatchSampler, ResumeGivesTheBatchesAnUninterruptedRunSees) {
  const uint64_t seed = fresh_seed();
  Rng rng(seed);
  const VectorExamples ex(random_lengths(rng, 25, 12), seed);
  SamplerConfig cfg{.seq_len = 16, .micro_batch = 2, .grad_accum = 3, .pack = true, .seed = seed};
  BatchSampler straight(ex, cfg);
  std::vector<Batch> expected(40);
  for (auto& b : expected) straight.next_batch(b);
  for (int stop : {0, 1, 3, 7, 20}) {  // mid global batch and at boundaries, across epochs
    BatchSampler first(ex, cfg);
    Batch b;
    for (int i = 0; i < stop; ++i) first.next_batch(b);
    const nlohmann::json saved = nlohmann::json::parse(first.state().dump());
    BatchSampler resumed(ex, cfg);
    resumed.set_state(saved);
    for (int i = stop; i < 40; ++i) {
      resumed.next_batch(b);
      ASSERT_EQ(b.tokens, expected[static_cast<size_t>(i)].tokens) << "stop " << stop << " batch " << i;
      ASSERT_EQ(b.targets, expected[static_cast<size_t>(i)].targets);
      ASSERT_EQ(b.doc_start, expected[static_cast<size_t>(i)].doc_start);
    }
  }
}

TEST(BatchSampler, ResumeOnAnotherWorldSizeContinuesTheGlobalBatches) {
  const VectorExamples ex(std::vector<size_t>(30, 6), 3);
  SamplerConfig two{.seq_len = 8, .micro_batch = 2, .grad_accum = 1, .world = 2, .pack = false, .seed = 9};
  BatchSampler rank0(ex, two);
  Batch b;
  for (int i = 0; i < 3; ++i) rank0.next_batch(b);
  SamplerConfig one = two;
  one.world = 1;
  one.micro_batch = 4;
  BatchSampler alone(ex, one);
  alone.set_state(rank0.state());
  BatchSampler reference(ex, one);
  for (int i = 0; i < 4; ++i) reference.next_batch(b);
  Batch got;
  alone.next_batch(got);
  EXPECT_EQ(got.tokens, b.tokens);
}

TEST(BatchSampler, RejectsAStateFromOtherData) {
  const VectorExamples ex(std::vector<size_t>(10, 4), 1), other(std::vector<size_t>(11, 4), 1);
  SamplerConfig cfg{.seq_len = 4, .micro_batch = 1, .pack = false};
  BatchSampler a(ex, cfg), b(other, cfg);
  EXPECT_THROW(b.set_state(a.state()), InputError);
  EXPECT_THROW(b.set_state(nlohmann::json{{"kind", "random_window"}}), InputError);
}

TEST(BatchSampler, OneEpochWithoutRepeatSeesEveryExampleOnce) {
  const VectorExamples ex(std::vector<size_t>(11, 5), 1);
  SamplerConfig cfg{.seq_len = 5, .micro_batch = 4, .pack = false, .shuffle = false, .repeat = false};
  BatchSampler sampler(ex, cfg);
  Batch b;
  std::set<int32_t> seen;
  int batches = 0;
  while (sampler.next(b)) {
    ++batches;
    for (int64_t r = 0; r < b.B; ++r)
      if (b.tokens[static_cast<size_t>(r * b.T)] != 0) seen.insert(b.tokens[static_cast<size_t>(r * b.T)] / 1000);
  }
  EXPECT_EQ(batches, 3);  // 4 + 4 + 3 (one padding row)
  EXPECT_EQ(seen.size(), 11u);
}

TEST(BatchSampler, LongExamplesAreCutAndCounted) {
  const VectorExamples ex({20, 3}, 1);
  SamplerConfig cfg{.seq_len = 8, .micro_batch = 2, .pack = false, .shuffle = false};
  BatchSampler sampler(ex, cfg);
  Batch b;
  sampler.next_batch(b);
  EXPECT_EQ(sampler.truncated(), 1);
  EXPECT_EQ(b.tokens[7], 1007);
}

// truncation_at counts, before training, exactly the targets that the sampler's rows keep
// and lose: an example of T + 1 tokens still fits (the last position predicts token T).
TEST(BatchSampler, TruncationStatsAreWhatTheRowsKeep) {
  Rng rng(fresh_seed());
  std::vector<size_t> lengths = random_lengths(rng, 40, 30);
  lengths.push_back(9);  // T + 1: fits whole
  const VectorExamples ex(lengths, rng.next_u64());
  const int64_t T = 8;
  const TruncationStats s = truncation_at(ex, T);

  int64_t targets = 0, truncated = 0, without = 0, longest = 0;
  for (size_t i = 0; i < ex.num_examples(); ++i) {
    const ExampleView v = ex.example(i);
    const auto n = static_cast<int64_t>(v.tokens.size());
    int64_t kept = 0;
    for (int64_t p = 1; p < n; ++p) {
      targets += v.mask[static_cast<size_t>(p)];
      if (p <= T) kept += v.mask[static_cast<size_t>(p)];
    }
    truncated += n > T + 1;
    without += kept == 0;
    longest = std::max(longest, n);
  }
  // What one epoch of padded rows actually holds as targets.
  SamplerConfig cfg{.seq_len = T, .micro_batch = 1, .pack = false, .shuffle = false, .repeat = false};
  BatchSampler sampler(ex, cfg);
  Batch b;
  int64_t in_rows = 0;
  while (sampler.next(b))
    for (int32_t t : b.targets) in_rows += t != -100;

  EXPECT_EQ(s.examples, static_cast<int64_t>(lengths.size()));
  EXPECT_EQ(s.targets, targets);
  EXPECT_EQ(s.targets - s.targets_lost, in_rows);
  EXPECT_EQ(s.truncated, truncated);
  EXPECT_EQ(s.without_targets, without);
  EXPECT_EQ(s.longest, longest);
  EXPECT_GT(s.truncated, 0);
  EXPECT_EQ(truncation_at(ex, 30).targets_lost, 0);
}

}  // namespace
}  // namespace flotilla::data
