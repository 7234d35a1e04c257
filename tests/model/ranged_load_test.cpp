// Ranged loading (Llama::load with ranges): a ZeRO-3 rank or a pipeline stage fills only
// its ranges of the parameter arena from a model directory, reading only the bytes of the
// files those ranges need. Specification: what a ranged load holds inside its ranges is
// bit for bit what a whole load holds there, and the rest of the arena is zero and never
// made resident; for float32 and bf16 files, one file or shards, ranges cutting tensors in
// the middle and spanning tensor (and file) boundaries.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/model/llama.hpp"
#include "../test_seed.hpp"
#include "random_model.hpp"

namespace flotilla::model {
namespace {
using ::flotilla::testing::test_seed;

// GQA, q/k/v biases, untied head; a vocabulary wide enough that the arena (about 2.4 MB)
// is a page-aligned mapping of its own (base/buffer.hpp), so that residency is per page.
ModelConfig ranged_load_config() {
  ModelConfig c;
  c.arch = Architecture::qwen2;
  c.qkv_bias = true;
  c.vocab_size = 4099;
  c.dim = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_dim = 96;
  c.max_position = 64;
  c.tie_embeddings = false;
  return c;
}

class RangedLoadDir {
 public:
  // The model's weights in `dtype`, in one file or in shards of at most `shard_bytes`.
  RangedLoadDir(const Llama& model, DType dtype, uint64_t shard_bytes, const std::string& tag)
      : path_(std::filesystem::temp_directory_path() / fmt::format("flotilla_ranged_load_{}_{}", tag, ::getpid())) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
    std::vector<io::TensorToWrite> tensors;
    for (const ParamInfo& info : model.layout().params())
      tensors.push_back({info.name, info.shape, model.params().data() + info.offset});
    const auto files = io::write_safetensors_sharded(path_, tensors, dtype, shard_bytes);
    n_files_ = files.size();
    write_file_atomic(path_ / "config.json", model.config().to_json().dump(2) + "\n");
  }
  ~RangedLoadDir() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }
  size_t n_files() const { return n_files_; }

 private:
  std::filesystem::path path_;
  size_t n_files_ = 0;
};

// Ascending, disjoint ranges of [0, n): `cuts` random cut points, every other piece kept,
// plus one range that starts 3 floats before the second tensor and ends 5 into it (a
// tensor boundary inside a range) merged in.
std::vector<ElementRange> random_ranges(Rng& rng, int64_t n, int cuts, const ParamInfo& second_tensor) {
  std::set<int64_t> points{0, n, second_tensor.offset - 3, second_tensor.offset + 5};
  while (static_cast<int>(points.size()) < cuts + 4) points.insert(static_cast<int64_t>(rng.below(static_cast<uint64_t>(n))));
  const std::vector<int64_t> p(points.begin(), points.end());
  std::vector<ElementRange> ranges;
  for (size_t i = 0; i + 1 < p.size(); ++i) {
    const bool boundary_piece = p[i] == second_tensor.offset - 3;
    if (i % 2 == 0 || boundary_piece) {
      if (!ranges.empty() && ranges.back().end == p[i])
        ranges.back().end = p[i + 1];
      else
        ranges.push_back({p[i], p[i + 1]});
    }
  }
  return ranges;
}

bool inside(std::span<const ElementRange> ranges, int64_t i) {
  const auto r = std::upper_bound(ranges.begin(), ranges.end(), i,
                                  [](int64_t x, const ElementRange& range) { return x < range.end; });
  return r != ranges.end() && r->begin <= i;
}

void expect_ranged_equals_whole_slice(const RangedLoadDir& dir, std::span<const ElementRange> ranges) {
  const Llama whole = Llama::load(dir.path());
  const Llama ranged = Llama::load(dir.path(), io::NonFinitePolicy::warn, {}, ranges);
  const std::span<const float> a = whole.params(), b = ranged.params();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const float expected = inside(ranges, static_cast<int64_t>(i)) ? a[i] : 0.0f;
    // Converted from the same file bytes: every bit equal, and nothing outside the ranges.
    ASSERT_EQ(std::memcmp(&b[i], &expected, sizeof(float)), 0)
        << "element " << i << ": ranged " << b[i] << ", expected " << expected;
  }
}

struct FileLayout {
  DType dtype;
  uint64_t shard_bytes;  // a limit below the model's bytes makes shards
  const char* tag;
};

TEST(RangedLoad, EqualsTheSameRangesOfAWholeLoad) {
  const uint64_t seed = test_seed();
  Rng rng(seed);
  const Llama model = test_models::random_model(ranged_load_config(), rng);
  const int64_t n = static_cast<int64_t>(model.params().size());
  const ParamInfo& second = model.layout().params()[1];
  for (const FileLayout& f : {FileLayout{DType::f32, uint64_t{1} << 40, "f32"}, FileLayout{DType::bf16, uint64_t{1} << 40, "bf16"},
                              FileLayout{DType::f32, 700'000, "f32_shards"}, FileLayout{DType::bf16, 300'000, "bf16_shards"}}) {
    SCOPED_TRACE(f.tag);
    const RangedLoadDir dir(model, f.dtype, f.shard_bytes, f.tag);
    if (f.shard_bytes < (uint64_t{1} << 40)) ASSERT_GT(dir.n_files(), 2u);  // shards and their index
    for (int cuts : {1, 7, 40}) {
      SCOPED_TRACE(fmt::format("{} cuts", cuts));
      expect_ranged_equals_whole_slice(dir, random_ranges(rng, n, cuts, second));
    }
    // A range from inside the first tensor to inside the last: every boundary, every file.
    const std::vector<ElementRange> across{{11, n - 13}};
    expect_ranged_equals_whole_slice(dir, across);
  }
}

TEST(RangedLoad, PagesOutsideTheRangesAreNeverResident) {
  Rng rng(test_seed());
  const Llama model = test_models::random_model(ranged_load_config(), rng);
  const RangedLoadDir dir(model, DType::bf16, uint64_t{1} << 40, "pages");
  const int64_t n = static_cast<int64_t>(model.params().size());
  const int64_t page_floats = ::sysconf(_SC_PAGESIZE) / static_cast<int64_t>(sizeof(float));
  // Two ranges cutting tensors anywhere: a third of the arena and a sliver at the end.
  const std::vector<ElementRange> ranges{{n / 5 + 3, n / 5 + n / 3}, {n - 1000, n - 1}};
  const Llama ranged = Llama::load(dir.path(), io::NonFinitePolicy::warn, {}, ranges);
  const std::span<const float> params = ranged.params();
  ASSERT_EQ(reinterpret_cast<uintptr_t>(params.data()) % static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE)), 0u)
      << "the arena is not a mapping of its own: residency cannot be read per page";
  const size_t pages = (params.size() + static_cast<size_t>(page_floats) - 1) / static_cast<size_t>(page_floats);
  std::vector<unsigned char> resident(pages);
  ASSERT_EQ(::mincore(const_cast<float*>(params.data()), params.size() * sizeof(float), resident.data()), 0);
  int64_t touched_outside = 0, missing_inside = 0;
  for (size_t p = 0; p < pages; ++p) {
    const int64_t first = static_cast<int64_t>(p) * page_floats, last = std::min(n, first + page_floats);
    bool meets = false, within = false;
    for (const ElementRange& r : ranges) {
      meets = meets || (r.begin < last && first < r.end);
      within = within || (r.begin <= first && last <= r.end);
    }
    if (!meets && (resident[p] & 1)) ++touched_outside;
    if (within && !(resident[p] & 1)) ++missing_inside;
  }
  EXPECT_EQ(touched_outside, 0) << "pages of the arena outside the ranges were written";
  EXPECT_EQ(missing_inside, 0) << "pages inside the ranges were not filled";
}

TEST(RangedLoad, ARangeOutsideTheArenaOrOutOfOrderIsAnError) {
  Rng rng(test_seed());
  const Llama model = test_models::random_model(ranged_load_config(), rng);
  const RangedLoadDir dir(model, DType::f32, uint64_t{1} << 40, "bad");
  const int64_t n = static_cast<int64_t>(model.params().size());
  for (const std::vector<ElementRange>& bad : {std::vector<ElementRange>{{0, n + 1}},
                                               std::vector<ElementRange>{{10, 20}, {5, 8}},
                                               std::vector<ElementRange>{{10, 20}, {15, 30}}})
    EXPECT_THROW(Llama::load(dir.path(), io::NonFinitePolicy::warn, {}, bad), Error);
}

}  // namespace
}  // namespace flotilla::model
