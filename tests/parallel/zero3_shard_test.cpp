// ZeRO-3's shard as a rank builds it: zero3_owned_ranges cuts every group (embedding, each
// block, head) into the ranks' chunks plus a tail all of them hold, and a model initialised
// on those ranges alone (Llama::init_random(seed, owned)) has exactly the whole model's
// values there, bit for bit, while every other float stays zero and every page outside
// the ranges is never made resident (what keeps a rank's memory at its shard).
#include "flotilla/parallel/zero3.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"

namespace flotilla::parallel {
namespace {

using ::flotilla::testing::test_seed;

// Every kind of tensor init_random writes: normal draws (Linear, embeddings), norms (ones)
// and q/k/v biases (zeros); an odd vocabulary, so no group divides by the world. Large
// enough (over 1 MiB of weights, tied or not) that the arena is its own anonymous mapping, whose
// untouched pages mincore reports as not resident.
model::ModelConfig shard_config(bool tied) {
  model::ModelConfig c;
  c.arch = model::Architecture::qwen2;
  c.qkv_bias = true;
  c.vocab_size = 4099;
  c.dim = 64;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_dim = 96;
  c.max_position = 64;
  c.tie_embeddings = tied;
  return c;
}

// The pages of `arena` that are resident now (mincore), by index from the arena's first page.
std::set<int64_t> resident_pages(std::span<const float> arena) {
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(arena.data()) / page * page;
  const auto end = reinterpret_cast<uintptr_t>(arena.data() + arena.size());
  const size_t pages = (end - begin + page - 1) / page;
  std::vector<unsigned char> in(pages);
  if (::mincore(reinterpret_cast<void*>(begin), end - begin, in.data()) != 0) throw Error("test", "mincore failed");
  std::set<int64_t> out;
  for (size_t i = 0; i < pages; ++i)
    if (in[i] & 1) out.insert(static_cast<int64_t>(i));
  return out;
}

// The pages the floats of `ranges` lie on, indexed as resident_pages does.
std::set<int64_t> pages_of(std::span<const float> arena, const std::vector<ArenaRange>& ranges) {
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto base = reinterpret_cast<uintptr_t>(arena.data()) / page * page;
  std::set<int64_t> out;
  for (const ArenaRange& r : ranges) {
    if (r.size() == 0) continue;
    const auto first = (reinterpret_cast<uintptr_t>(arena.data() + r.begin) - base) / page;
    const auto last = (reinterpret_cast<uintptr_t>(arena.data() + r.end - 1) - base) / page;
    for (uintptr_t p = first; p <= last; ++p) out.insert(static_cast<int64_t>(p));
  }
  return out;
}

bool inside(const std::vector<ArenaRange>& ranges, int64_t i) {
  return std::any_of(ranges.begin(), ranges.end(), [&](const ArenaRange& r) { return r.begin <= i && i < r.end; });
}

TEST(Zero3Shard, RanksChunksAndTheSharedTailsTileTheArena) {
  for (const bool tied : {false, true}) {
    const model::ModelConfig cfg = shard_config(tied);
    const model::ParamLayout layout(cfg);
    const int64_t arena = layout.total_numel();
    for (int64_t world = 1; world <= 5; ++world) {
      // How many ranks hold each float: 1 in a chunk, `world` in a tail.
      std::vector<int> holders(static_cast<size_t>(arena), 0);
      int64_t held_by_all = 0;
      for (int64_t rank = 0; rank < world; ++rank) {
        const std::vector<ArenaRange> owned = zero3_owned_ranges(cfg, layout, world, rank);
        for (size_t i = 0; i < owned.size(); ++i) {
          EXPECT_LT(owned[i].begin, owned[i].end);
          if (i > 0) EXPECT_LE(owned[i - 1].end, owned[i].begin) << "ascending and disjoint";
          for (int64_t f = owned[i].begin; f < owned[i].end; ++f) ++holders[static_cast<size_t>(f)];
        }
      }
      for (int64_t f = 0; f < arena; ++f) {
        const int h = holders[static_cast<size_t>(f)];
        ASSERT_TRUE(h == 1 || h == world) << fmt::format("float {} held by {} of {} ranks", f, h, world);
        if (world > 1 && h == world) ++held_by_all;
      }
      // Tails are shorter than the world in each of the 2 + n_layers groups.
      EXPECT_LT(held_by_all, (2 + cfg.n_layers) * world) << "world " << world;
    }
  }
  EXPECT_THROW(zero3_owned_ranges(shard_config(false), model::ParamLayout(shard_config(false)), 3, 3), Error);
}

TEST(Zero3Shard, ARankBuildsExactlyTheWholeInitOnItsRangesAndTouchesNothingElse) {
  const uint64_t seed = test_seed();
  for (const bool tied : {false, true}) {
    const model::ModelConfig cfg = shard_config(tied);
    model::Llama whole(cfg);
    whole.init_random(seed);
    const std::span<const float> all = std::as_const(whole).params();
    for (int64_t world = 1; world <= 5; ++world) {
      for (int64_t rank = 0; rank < world; ++rank) {
        SCOPED_TRACE(fmt::format("tied {}, rank {} of {}", tied, rank, world));
        model::Llama part(cfg);
        const std::vector<ArenaRange> owned = zero3_owned_ranges(cfg, part.layout(), world, rank);
        part.init_random(seed, owned);
        const std::span<const float> mine = std::as_const(part).params();
        // Before anything reads the arena: only the owned ranges' pages were written.
        const std::set<int64_t> resident = resident_pages(mine), allowed = pages_of(mine, owned);
        for (int64_t p : resident) EXPECT_TRUE(allowed.count(p)) << "page " << p << " made resident";
        for (size_t i = 0; i < mine.size(); ++i) {
          const float want = inside(owned, static_cast<int64_t>(i)) ? all[i] : 0.0f;
          ASSERT_EQ(std::memcmp(&mine[i], &want, sizeof(float)), 0)
              << fmt::format("float {}: {} against {}", i, mine[i], want);
        }
      }
    }
  }
}

TEST(Zero3Shard, AnyRangesInitToTheWholeModelsValues) {
  // Random ascending ranges (in a tensor, across tensors, empty, touching): the skipped
  // stream must land each draw where the whole init puts it.
  const uint64_t seed = test_seed();
  std::mt19937_64 gen(seed);
  const model::ModelConfig cfg = shard_config(false);
  model::Llama whole(cfg);
  whole.init_random(seed);
  const std::span<const float> all = std::as_const(whole).params();
  const auto arena = static_cast<int64_t>(all.size());
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<int64_t> cuts(static_cast<size_t>(2 * (1 + gen() % 12)));
    for (int64_t& c : cuts) c = static_cast<int64_t>(gen() % static_cast<uint64_t>(arena + 1));
    std::sort(cuts.begin(), cuts.end());
    std::vector<ArenaRange> ranges;
    for (size_t i = 0; i < cuts.size(); i += 2) ranges.push_back({cuts[i], cuts[i + 1]});
    model::Llama part(cfg);
    part.init_random(seed, ranges);
    const std::span<const float> mine = std::as_const(part).params();
    for (int64_t i = 0; i < arena; ++i) {
      const float want = inside(ranges, i) ? all[static_cast<size_t>(i)] : 0.0f;
      ASSERT_EQ(std::memcmp(&mine[static_cast<size_t>(i)], &want, sizeof(float)), 0)
          << fmt::format("trial {}, float {}", trial, i);
    }
  }
  model::Llama part(cfg);
  const std::vector<ArenaRange> descending = {{100, 200}, {0, 50}};
  EXPECT_THROW(part.init_random(seed, descending), Error);
}

}  // namespace
}  // namespace flotilla::parallel
