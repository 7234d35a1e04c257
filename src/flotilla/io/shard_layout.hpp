// A sharded checkpoint's layout (docs/sharded-checkpoints.md): which ranges of the flat
// trainable arena each rank's file holds, and copying between such ranges.
//
// Vocabulary:
//   arena   the flat float32 buffer of the trainable tensors, `arena_floats` long; the
//           optimizer's moments use the same offsets
//   kind    an array over the arena a file holds a part of: "weights", "m", "v"
//   range   [begin, end) of arena offsets, in floats; a file holds its ranges of a kind
//           one after the other, in ascending `begin`, as one 1-D F32 tensor named by
//           the kind
//
// layout.json:
//   {"format": "flotilla-sharded-layout", "version": 1, "arena_floats": n,
//    "table": [{"name", "shape", "offset", "numel"}, ...],
//    "files": {"rank-00000.safetensors": {"weights": [[b, e], ...], "m": [...], "v": [...]}, ...},
//    "rank_state": {"world": N, "files": ["rank-00000.state.safetensors", ...]}}
//   rank_state (optional): files of state each rank alone holds (not ranges of the arena),
//   one per rank of the world that wrote them, usable only on a world of the same size
//
// io/ stays free of collectives and of the model: the training layer fills the table and
// the ranges (train/sharded_checkpoint.hpp).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace flotilla::io {

inline constexpr std::string_view kShardLayoutFile = "layout.json";

// [begin, end) of the arena, in floats.
struct FloatRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const FloatRange&) const = default;
};

// The sum of the ranges' sizes.
int64_t total_floats(std::span<const FloatRange> ranges);

// Copies every overlap of a source range and a destination range. `src` holds the floats
// of `src_ranges` one after the other, `dst` those of `dst_ranges`; each list ascending
// and disjoint (Error otherwise, or when a buffer's size is not its ranges' total).
// Returns the floats copied. Only the overlaps are touched: of an mmapped source, only
// their pages are read.
int64_t copy_overlap(std::span<const FloatRange> src_ranges, std::span<const float> src,
                     std::span<const FloatRange> dst_ranges, std::span<float> dst);

// A range of one kind in one file.
struct OwnedRange {
  std::string file;
  FloatRange range;
};

// Empty when the ranges tile [0, arena_floats) exactly once; otherwise one line naming
// the first range of `kind` that is missing, written twice (and by which files) or lies
// outside the arena.
std::string check_tiling(std::string_view kind, int64_t arena_floats, std::vector<OwnedRange> ranges);

struct ShardLayout {
  struct Param {
    std::string name;
    std::vector<int64_t> shape;
    int64_t offset = 0, numel = 0;
  };
  // A file's ranges of each kind, ascending.
  using FileRanges = std::map<std::string, std::vector<FloatRange>>;

  int64_t arena_floats = 0;
  std::vector<Param> table;
  std::map<std::string, FileRanges> files;  // by file name
  int64_t rank_state_world = 0;              // 0: no per-rank state files
  std::vector<std::string> rank_state_files;  // rank r's at [r]

  nlohmann::json to_json() const;
  // InputError naming `path` when `json` is not a layout of this shape.
  static ShardLayout from_json(const nlohmann::json& json, const std::filesystem::path& path);
  // Empty when every kind of `kinds` is tiled exactly once by the files (check_tiling)
  // and every range of every file is ascending and disjoint; otherwise one line.
  std::string check_coverage(std::span<const std::string_view> kinds) const;
};

}  // namespace flotilla::io
