// A sharded checkpoint's ranges as a specification: copying the overlap of saved ranges
// into needed ones (any cut onto any other), the tiling check that finds a missing or
// doubled range, and layout.json read back as written.
#include "flotilla/io/shard_layout.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "../test_seed.hpp"

namespace flotilla::io {
namespace {

// The floats of `ranges` from an arena whose float i is i + 0.5: what a file of them holds.
std::vector<float> holds(const std::vector<FloatRange>& ranges) {
  std::vector<float> out;
  for (const FloatRange& r : ranges)
    for (int64_t i = r.begin; i < r.end; ++i) out.push_back(static_cast<float>(i) + 0.5f);
  return out;
}

// A random cut of [0, n) into `parts` ranges, some of them empty and dropped, some split
// again (a ZeRO shard's chunks of several units); then dealt to `files` owners.
std::vector<std::vector<FloatRange>> random_cut(std::mt19937_64& rng, int64_t n, int files) {
  std::vector<int64_t> cuts = {0, n};
  const int pieces = static_cast<int>(rng() % 12);
  for (int i = 0; i < pieces; ++i) cuts.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(n + 1)));
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::vector<FloatRange>> owners(static_cast<size_t>(files));
  for (size_t i = 0; i + 1 < cuts.size(); ++i)
    if (cuts[i] < cuts[i + 1]) owners[rng() % static_cast<uint64_t>(files)].push_back({cuts[i], cuts[i + 1]});
  return owners;
}

TEST(CopyOverlap, AnyCutOntoAnyOtherCopiesEveryFloatOnce) {
  const uint64_t seed = flotilla::testing::test_seed();
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 100);
    const int saved_files = 1 + static_cast<int>(rng() % 5), wanted_files = 1 + static_cast<int>(rng() % 5);
    const auto saved = random_cut(rng, n, saved_files);
    const auto wanted = random_cut(rng, n, wanted_files);
    for (const std::vector<FloatRange>& want : wanted) {
      std::vector<float> got(static_cast<size_t>(total_floats(want)), -1.0f);
      int64_t copied = 0;
      for (const std::vector<FloatRange>& have : saved) copied += copy_overlap(have, holds(have), want, got);
      EXPECT_EQ(copied, total_floats(want)) << "trial " << trial;
      EXPECT_EQ(got, holds(want)) << "trial " << trial;
    }
  }
}

TEST(CopyOverlap, DisjointRangesCopyNothing) {
  std::vector<float> dst(4, -1.0f);
  EXPECT_EQ(copy_overlap(std::vector<FloatRange>{{0, 4}}, holds({{0, 4}}), std::vector<FloatRange>{{4, 8}}, dst), 0);
  EXPECT_EQ(dst, std::vector<float>(4, -1.0f));
}

TEST(CopyOverlap, RefusesRangesOutOfOrderOrBuffersOfAnotherSize) {
  std::vector<float> dst(4);
  EXPECT_THROW(copy_overlap(std::vector<FloatRange>{{2, 4}, {0, 2}}, holds({{0, 4}}), std::vector<FloatRange>{{0, 4}}, dst),
               Error);
  EXPECT_THROW(copy_overlap(std::vector<FloatRange>{{0, 4}}, holds({{0, 3}}), std::vector<FloatRange>{{0, 4}}, dst), Error);
}

TEST(CheckTiling, ExactTilingPasses) {
  EXPECT_EQ(check_tiling("m", 10, {{"rank-1", {4, 10}}, {"rank-0", {0, 4}}}), "");
  EXPECT_EQ(check_tiling("m", 0, {}), "");
}

TEST(CheckTiling, NamesTheMissingRange) {
  EXPECT_EQ(check_tiling("m", 10, {{"rank-0", {0, 4}}, {"rank-1", {6, 10}}}),
            "range [4, 6) of m is in no rank file (damaged checkpoint)");
  EXPECT_EQ(check_tiling("v", 10, {{"rank-0", {0, 4}}}), "range [4, 10) of v is in no rank file (damaged checkpoint)");
  EXPECT_EQ(check_tiling("v", 10, {{"rank-0", {2, 10}}}), "range [0, 2) of v is in no rank file (damaged checkpoint)");
}

TEST(CheckTiling, NamesTheRangeWrittenTwiceAndItsFiles) {
  EXPECT_EQ(check_tiling("weights", 10, {{"rank-0", {0, 6}}, {"rank-1", {4, 10}}}),
            "range [4, 6) of weights is written twice, by rank-0 and rank-1 (damaged checkpoint)");
}

TEST(CheckTiling, NamesARangeOutsideTheArena) {
  EXPECT_EQ(check_tiling("m", 10, {{"rank-0", {0, 12}}}),
            "rank-0: range [0, 12) of m lies outside the arena [0, 10) or is empty");
}

ShardLayout two_file_layout() {
  ShardLayout layout;
  layout.arena_floats = 40;
  layout.table = {{"a.weight", {4, 4}, 0, 16}, {"b.bias", {8}, 16, 8}, {"c.weight", {2, 8}, 24, 16}};
  for (const char* kind : {"weights", "m", "v"}) {
    layout.files["rank-00000.safetensors"][kind] = {{0, 10}, {30, 40}};
    layout.files["rank-00001.safetensors"][kind] = {{10, 30}};
  }
  return layout;
}

TEST(ShardLayout, ReadsBackWhatItWrites) {
  const ShardLayout layout = two_file_layout();
  const ShardLayout back = ShardLayout::from_json(layout.to_json(), "layout.json");
  EXPECT_EQ(back.arena_floats, 40);
  ASSERT_EQ(back.table.size(), 3u);
  EXPECT_EQ(back.table[1].name, "b.bias");
  EXPECT_EQ(back.table[1].shape, std::vector<int64_t>{8});
  EXPECT_EQ(back.table[2].offset, 24);
  EXPECT_EQ(back.files.at("rank-00000.safetensors").at("m"), (std::vector<FloatRange>{{0, 10}, {30, 40}}));
  const std::vector<std::string_view> kinds = {"weights", "m", "v"};
  EXPECT_EQ(back.check_coverage(kinds), "");
}

TEST(ShardLayout, CoverageNamesTheKindAndTheRange) {
  ShardLayout layout = two_file_layout();
  layout.files["rank-00001.safetensors"]["v"] = {{10, 25}};
  const std::vector<std::string_view> kinds = {"weights", "m", "v"};
  EXPECT_EQ(layout.check_coverage(kinds), "layout.json: range [25, 30) of v is in no rank file (damaged checkpoint)");
  layout.files["rank-00001.safetensors"]["v"] = {{20, 30}, {10, 20}};
  EXPECT_EQ(layout.check_coverage(kinds),
            "layout.json: rank-00001.safetensors: range [10, 20) is not after [20, 30) of v");
}

TEST(ShardLayout, RefusesAMalformedLayoutNamingTheFile) {
  nlohmann::json json = two_file_layout().to_json();
  json["files"]["../evil"] = nlohmann::json::object();
  EXPECT_THROW(ShardLayout::from_json(json, "step/layout.json"), InputError);
  EXPECT_THROW(ShardLayout::from_json(nlohmann::json{{"format", "other"}}, "step/layout.json"), InputError);
  try {
    ShardLayout::from_json(nlohmann::json{{"format", "flotilla-sharded-layout"}, {"version", 1}}, "step/layout.json");
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("step/layout.json"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flotilla::io
