// flotilla launch's choices between attempts: the hostfile it reads and the shape of the
// world it relaunches on (train/elastic.hpp).
#include "flotilla/train/elastic.hpp"

#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/rng.hpp"
#include "../test_seed.hpp"

namespace flotilla::train {
namespace {

using ::flotilla::testing::test_seed;

TEST(Hostfile, ReadsHostsSlotsCommentsAndBlankLines) {
  const std::vector<HostSlots> hosts = parse_hostfile(
      "# the fleet\n"
      "laptop-a slots=1\n"
      "\n"
      "10.233.0.2   slots=4 max_slots=8  # Open MPI's cap is ignored\n"
      "desktop\n",
      "hosts");
  const std::vector<HostSlots> expected = {{"laptop-a", 1}, {"10.233.0.2", 4}, {"desktop", 1}};
  EXPECT_EQ(hosts, expected);
  EXPECT_TRUE(parse_hostfile("", "empty").empty());
}

TEST(Hostfile, MalformedLinesAreOneLineNamingFileAndLine) {
  const auto message = [](const char* text) {
    try {
      parse_hostfile(text, "hosts");
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("a slots=2\nb slots=0\n").find("hosts:2: slots=0 is not a positive integer"), std::string::npos);
  EXPECT_NE(message("a slots=two\n").find("hosts:1: slots=two"), std::string::npos);
  EXPECT_NE(message("a cpus=2\n").find("hosts:1: 'cpus=2' is not slots=N"), std::string::npos);
  EXPECT_NE(message("a\n\na slots=2\n").find("hosts:3: host a is named twice"), std::string::npos);
}

TEST(ElasticShape, KeepsTheGlobalBatchOnFewerRanksWithoutGrowingMicroBatches) {
  // 4 ranks x 2 rows: on 3 slots, 3 does not divide 8, so 2 ranks of 4 rows = 2 x 2.
  const std::vector<HostSlots> three = {{"a", 2}, {"b", 1}};
  const auto s = plan_elastic_shape(three, 0, 8, 2);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->world, 2);
  EXPECT_EQ(s->batch_size, 2);
  EXPECT_EQ(s->grad_accum, 2);
  EXPECT_EQ(s->hosts, (std::vector<HostSlots>{{"a", 2}}));
  EXPECT_EQ(s->global_rows(), 8);
  EXPECT_EQ(s->describe(), "2 ranks on 1 host (a:2), 2 rows x 2 micro-batches each = 8 rows per step");
  // --max-hosts 1 leaves b out; none at all is nothing to launch.
  EXPECT_EQ(plan_elastic_shape({{"a", 1}, {"b", 1}}, 1, 6, 3)->hosts, (std::vector<HostSlots>{{"a", 1}}));
  EXPECT_FALSE(plan_elastic_shape({}, 0, 8, 2));
  EXPECT_THROW(plan_elastic_shape(three, 0, 0, 2), InputError);
}

// --deterministic-group: every rank's micro-batch a whole number of groups, the world a
// divisor of the groups; one group even where --batch-size is below it.
TEST(ElasticShape, DeterministicGroupsStayWhole) {
  const std::vector<HostSlots> four = {{"a", 2}, {"b", 2}};
  const auto rows = plan_elastic_shape(four, 0, 12, 4);
  EXPECT_EQ(rows->world, 4);
  EXPECT_EQ(rows->batch_size, 3);
  const auto groups = plan_elastic_shape(four, 0, 12, 4, 4);
  EXPECT_EQ(groups->world, 3);
  EXPECT_EQ(groups->batch_size, 4);
  EXPECT_EQ(groups->grad_accum, 1);
  const auto small = plan_elastic_shape({{"a", 1}}, 0, 16, 2, 4);
  EXPECT_EQ(small->batch_size, 4);
  EXPECT_EQ(small->grad_accum, 4);
  EXPECT_THROW(plan_elastic_shape(four, 0, 10, 4, 4), InputError);
}

// Random fleets and batches: the shape always keeps G exactly, fits the hosts, never
// makes a micro-batch larger than asked, and uses the most ranks that divide G.
TEST(ElasticShape, RandomFleetsKeepEveryInvariant) {
  Rng rng(test_seed());
  for (int trial = 0; trial < 500; ++trial) {
    std::vector<HostSlots> hosts;
    const int n = 1 + static_cast<int>(rng.below(5));
    for (int h = 0; h < n; ++h) hosts.push_back({"h" + std::to_string(h), 1 + static_cast<int>(rng.below(4))});
    const int max_hosts = static_cast<int>(rng.below(static_cast<uint64_t>(n) + 1));
    const int64_t G = 1 + static_cast<int64_t>(rng.below(48));
    const int64_t max_b = 1 + static_cast<int64_t>(rng.below(8));
    const auto s = plan_elastic_shape(hosts, max_hosts, G, max_b);
    ASSERT_TRUE(s);
    EXPECT_EQ(s->global_rows(), G);
    EXPECT_LE(s->batch_size, max_b);
    int used = 0, offered = 0;
    const int usable = max_hosts > 0 ? max_hosts : n;
    for (int h = 0; h < usable; ++h) offered += hosts[static_cast<size_t>(h)].slots;
    for (size_t i = 0; i < s->hosts.size(); ++i) {
      EXPECT_EQ(s->hosts[i].host, hosts[i].host);
      EXPECT_LE(s->hosts[i].slots, hosts[i].slots);
      used += s->hosts[i].slots;
    }
    EXPECT_EQ(used, s->world);
    for (int w = s->world + 1; w <= offered; ++w) EXPECT_NE(G % w, 0) << "a larger world " << w << " divides " << G;
    // The micro-batch is the largest divisor of the rank's rows within the limit.
    const int64_t rows = G / s->world;
    for (int64_t b = s->batch_size + 1; b <= std::min(rows, max_b); ++b) EXPECT_NE(rows % b, 0);
  }
}

TEST(HostQuorum, OnlyASideWithAStrictMajorityOfTheLastWorldGoesOn) {
  const std::vector<HostSlots> last = {{"h0", 1}, {"h1", 1}, {"h2", 2}, {"h3", 1}};
  // 3|1: the side of three goes on, the side of one stops.
  EXPECT_TRUE(last_world_quorum(last, {{"h0", 1}, {"h1", 1}, {"h3", 1}}).majority());
  EXPECT_FALSE(last_world_quorum(last, {{"h2", 2}}).majority());
  // 2|2: neither side has more than half, so neither trains. Slots do not count: h2 has 2.
  EXPECT_FALSE(last_world_quorum(last, {{"h0", 1}, {"h1", 1}}).majority());
  EXPECT_FALSE(last_world_quorum(last, {{"h2", 2}, {"h3", 1}}).majority());
  // A host that was not in the last world does not make a majority (it cannot tell which
  // side it is on); every member answering (a killed rank, no host lost) always goes on.
  EXPECT_FALSE(last_world_quorum(last, {{"h0", 1}, {"h1", 1}, {"h9", 4}}).majority());
  EXPECT_TRUE(last_world_quorum(last, last).majority());
  EXPECT_TRUE(last_world_quorum({{"a", 1}}, {{"a", 1}}).majority());
  EXPECT_FALSE(last_world_quorum({{"a", 1}, {"b", 1}}, {{"a", 1}}).majority());
  EXPECT_EQ(last_world_quorum(last, {{"h0", 1}, {"h1", 1}}).describe(),
            "2 of the last world's 4 hosts answer (h0, h1; not h2, h3)");
}

TEST(CheckpointHolders, ASmallerWorldTakesHostsThatHoldEveryRanksFiles) {
  const std::vector<HostSlots> four = {{"h0", 1}, {"h1", 1}, {"h2", 1}, {"h3", 1}};
  // One replica on the next host: rank 2's files on h2 and h3, rank 3's on h3 and h0.
  const auto holders = checkpoint_holders(four, 1);
  EXPECT_EQ(holders, (std::vector<std::vector<std::string>>{{"h0", "h1"}, {"h1", "h2"}, {"h2", "h3"}, {"h3", "h0"}}));
  EXPECT_EQ(checkpoint_holders(four, -1), holders);
  EXPECT_EQ(checkpoint_holders({{"a", 2}}, -1), (std::vector<std::vector<std::string>>{{"a"}, {"a"}}));
  // h3 lost, 3 hosts answer and the global batch of 4 rows takes 2 of them: not h0 and h1
  // (rank 2's files are on h2 and h3 only) but h0 and h2.
  const std::vector<HostSlots> alive = {{"h0", 1}, {"h1", 1}, {"h2", 1}};
  const std::vector<HostSlots> order = holders_first(alive, holders);
  EXPECT_EQ(order, (std::vector<HostSlots>{{"h0", 1}, {"h2", 1}, {"h1", 1}}));
  const std::optional<ElasticShape> s = plan_elastic_shape(order, 0, 4, 1);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->hosts, (std::vector<HostSlots>{{"h0", 1}, {"h2", 1}}));
  // h2 lost instead: h0 with any other host misses rank 1's or rank 2's files; h1 and h3
  // hold them all (h0 may be left out: it runs mpirun either way).
  const std::vector<HostSlots> without_h2 = {{"h0", 1}, {"h1", 1}, {"h3", 1}};
  EXPECT_EQ(holders_first(without_h2, holders), (std::vector<HostSlots>{{"h1", 1}, {"h3", 1}, {"h0", 1}}));
  // A rank whose files no answering host holds: no cover, the order is kept.
  EXPECT_EQ(holders_first({{"h0", 1}, {"h1", 1}}, holders), (std::vector<HostSlots>{{"h0", 1}, {"h1", 1}}));
}

}  // namespace
}  // namespace flotilla::train
