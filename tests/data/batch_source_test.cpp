// BatchSource: random windows for training, sequential windows for evaluation.
#include <gtest/gtest.h>

#include <numeric>
#include <set>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/data/text_dataset.hpp"

namespace flotilla::data {
namespace {

// A stream whose token at index i is i: every window reveals its offset.
std::vector<int32_t> iota_stream(size_t n) {
  std::vector<int32_t> s(n);
  std::iota(s.begin(), s.end(), 0);
  return s;
}

struct Batch {
  int B, T;
  std::vector<int32_t> tokens, targets;  // (B, T)
  Batch(int B_, int T_) : B(B_), T(T_), tokens(B_ * T_), targets(B_ * T_) {}
  void fill(BatchSource& src) { src.next_batch(tokens.data(), targets.data(), B, T); }
  int32_t row_start(int b) const { return tokens[b * T]; }
};

TEST(RandomWindowSource, TargetsAreInputsShiftedByOne) {
  RandomWindowSource src(iota_stream(1000), 7);
  Batch batch(4, 16);
  for (int step = 0; step < 5; ++step) {
    batch.fill(src);
    for (int b = 0; b < batch.B; ++b) {
      for (int t = 0; t < batch.T; ++t) {
        // Consecutive stream tokens; the target is the next one.
        EXPECT_EQ(batch.tokens[b * batch.T + t], batch.row_start(b) + t);
        EXPECT_EQ(batch.targets[b * batch.T + t], batch.tokens[b * batch.T + t] + 1);
      }
    }
  }
}

TEST(RandomWindowSource, SameSeedSameBatchesDifferentSeedDifferentBatches) {
  RandomWindowSource a(iota_stream(5000), 1234), b(iota_stream(5000), 1234), c(iota_stream(5000), 99);
  Batch ba(8, 32), bb(8, 32), bc(8, 32);
  bool any_differs = false;
  for (int step = 0; step < 10; ++step) {
    ba.fill(a);
    bb.fill(b);
    bc.fill(c);
    EXPECT_EQ(ba.tokens, bb.tokens);
    EXPECT_EQ(ba.targets, bb.targets);
    any_differs |= ba.tokens != bc.tokens;
  }
  EXPECT_TRUE(any_differs);
}

TEST(RandomWindowSource, SavedStateResumesExactly) {
  RandomWindowSource uninterrupted(iota_stream(3000), 42);
  Batch batch(4, 24);
  for (int step = 0; step < 3; ++step) batch.fill(uninterrupted);
  // Through text, as a checkpoint would store it.
  const std::string saved = uninterrupted.state().dump();
  std::vector<std::vector<int32_t>> expected;
  for (int step = 0; step < 5; ++step) {
    batch.fill(uninterrupted);
    expected.push_back(batch.tokens);
  }
  RandomWindowSource resumed(iota_stream(3000), 0);  // the seed is overridden by the state
  resumed.set_state(nlohmann::json::parse(saved));
  for (int step = 0; step < 5; ++step) {
    batch.fill(resumed);
    EXPECT_EQ(batch.tokens, expected[step]) << "step " << step;
  }
}

TEST(RandomWindowSource, OffsetsCoverTheWholeValidRange) {
  // n = T + 3 leaves exactly 3 offsets {0, 1, 2}; the last window ends on the last token.
  const int T = 8;
  RandomWindowSource src(iota_stream(T + 3), 5);
  Batch batch(64, T);
  batch.fill(src);
  std::set<int32_t> starts;
  for (int b = 0; b < batch.B; ++b) starts.insert(batch.row_start(b));
  EXPECT_EQ(starts, (std::set<int32_t>{0, 1, 2}));
}

TEST(RandomWindowSource, StreamOfExactlyTPlusOneTokensWorks) {
  RandomWindowSource src(iota_stream(17), 3);
  Batch batch(2, 16);
  batch.fill(src);
  EXPECT_EQ(batch.row_start(0), 0);
  EXPECT_EQ(batch.targets.back(), 16);
}

TEST(RandomWindowSource, StreamShorterThanTPlusOneIsAnError) {
  RandomWindowSource src(iota_stream(16), 3);
  Batch batch(2, 16);
  try {
    batch.fill(src);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("has 16 tokens"), std::string::npos) << e.what();
  }
}

TEST(RandomWindowSource, StateFromAnotherStreamOrKindIsRefused) {
  RandomWindowSource src(iota_stream(100), 1);
  RandomWindowSource other(iota_stream(200), 1);
  SequentialWindowSource seq(iota_stream(100));
  EXPECT_THROW(src.set_state(other.state()), InputError);
  EXPECT_THROW(src.set_state(seq.state()), InputError);
  EXPECT_THROW(src.set_state(nlohmann::json::parse(R"({"kind":"random_window","stream_tokens":100})")),
               InputError);
}

TEST(SequentialWindowSource, ConsecutiveNonOverlappingWindowsCoverThePass) {
  const int T = 10;
  const size_t n = 95;  // (95 - 1) / 10 = 9 windows; the targets of the last 4 tokens are never used
  ASSERT_EQ(SequentialWindowSource::windows_per_pass(n, T), 9u);
  SequentialWindowSource src(iota_stream(n));
  Batch batch(3, T);
  std::vector<int32_t> starts;
  for (int step = 0; step < 3; ++step) {
    batch.fill(src);
    for (int b = 0; b < batch.B; ++b) {
      starts.push_back(batch.row_start(b));
      for (int t = 0; t < T; ++t) EXPECT_EQ(batch.targets[b * T + t], batch.tokens[b * T + t] + 1);
    }
  }
  EXPECT_EQ(starts, (std::vector<int32_t>{0, 10, 20, 30, 40, 50, 60, 70, 80}));
}

TEST(SequentialWindowSource, WrapsAroundToTheStart) {
  SequentialWindowSource src(iota_stream(31));  // 3 windows of T = 10
  Batch batch(2, 10);
  std::vector<int32_t> starts;
  for (int step = 0; step < 3; ++step) {
    batch.fill(src);
    starts.push_back(batch.row_start(0));
    starts.push_back(batch.row_start(1));
  }
  EXPECT_EQ(starts, (std::vector<int32_t>{0, 10, 20, 0, 10, 20}));
}

TEST(SequentialWindowSource, StateSaveRestoreAndReset) {
  SequentialWindowSource a(iota_stream(200)), b(iota_stream(200));
  Batch batch(2, 16);
  batch.fill(a);
  b.set_state(nlohmann::json::parse(a.state().dump()));
  batch.fill(a);
  const int32_t next_a = batch.row_start(0);
  batch.fill(b);
  EXPECT_EQ(batch.row_start(0), next_a);
  EXPECT_EQ(next_a, 32);
  b.reset();
  batch.fill(b);
  EXPECT_EQ(batch.row_start(0), 0);
}

TEST(SequentialWindowSource, StreamShorterThanTPlusOneIsAnError) {
  SequentialWindowSource src(iota_stream(5));
  Batch batch(1, 5);
  EXPECT_THROW(batch.fill(src), InputError);
}

}  // namespace
}  // namespace flotilla::data
