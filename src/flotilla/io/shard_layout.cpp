#include "flotilla/io/shard_layout.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"

namespace flotilla::io {
namespace {

constexpr std::string_view kShardLayoutComponent = "io/shard_layout";
constexpr std::string_view kLayoutFormat = "flotilla-sharded-layout";
constexpr int kLayoutVersion = 1;

// Empty when `ranges` are ascending, disjoint and not empty each.
std::string check_ascending(std::span<const FloatRange> ranges) {
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (ranges[i].begin < 0 || ranges[i].end <= ranges[i].begin)
      return fmt::format("range [{}, {}) is empty or negative", ranges[i].begin, ranges[i].end);
    if (i > 0 && ranges[i].begin < ranges[i - 1].end)
      return fmt::format("range [{}, {}) is not after [{}, {})", ranges[i].begin, ranges[i].end, ranges[i - 1].begin,
                         ranges[i - 1].end);
  }
  return {};
}

}  // namespace

int64_t total_floats(std::span<const FloatRange> ranges) {
  int64_t n = 0;
  for (const FloatRange& r : ranges) n += r.size();
  return n;
}

int64_t copy_overlap(std::span<const FloatRange> src_ranges, std::span<const float> src,
                     std::span<const FloatRange> dst_ranges, std::span<float> dst) {
  for (const auto& [ranges, what] : {std::pair{src_ranges, "source"}, std::pair{dst_ranges, "destination"}}) {
    const std::string problem = check_ascending(ranges);
    if (!problem.empty()) throw Error(kShardLayoutComponent, fmt::format("copy_overlap: {} {}", what, problem));
  }
  if (total_floats(src_ranges) != static_cast<int64_t>(src.size()) ||
      total_floats(dst_ranges) != static_cast<int64_t>(dst.size()))
    throw Error(kShardLayoutComponent, fmt::format("copy_overlap: buffers of {} and {} floats for ranges of {} and {}", src.size(),
                                        dst.size(), total_floats(src_ranges), total_floats(dst_ranges)));
  // Both lists ascending: one merge walk. `*_at` is where the current range starts in its buffer.
  int64_t copied = 0;
  size_t i = 0, j = 0;
  int64_t src_at = 0, dst_at = 0;
  while (i < src_ranges.size() && j < dst_ranges.size()) {
    const FloatRange& s = src_ranges[i];
    const FloatRange& d = dst_ranges[j];
    const int64_t begin = std::max(s.begin, d.begin), end = std::min(s.end, d.end);
    if (begin < end) {
      std::memcpy(dst.data() + dst_at + (begin - d.begin), src.data() + src_at + (begin - s.begin),
                  static_cast<size_t>(end - begin) * sizeof(float));
      copied += end - begin;
    }
    // The range that ends first can overlap nothing further.
    if (s.end <= d.end) {
      src_at += s.size();
      ++i;
    } else {
      dst_at += d.size();
      ++j;
    }
  }
  return copied;
}

std::string check_tiling(std::string_view kind, int64_t arena_floats, std::vector<OwnedRange> ranges) {
  std::sort(ranges.begin(), ranges.end(), [](const OwnedRange& a, const OwnedRange& b) {
    return a.range.begin != b.range.begin ? a.range.begin < b.range.begin : a.range.end < b.range.end;
  });
  int64_t covered = 0;  // [0, covered) is tiled once by the ranges before
  const OwnedRange* last = nullptr;
  for (const OwnedRange& r : ranges) {
    if (r.range.begin < 0 || r.range.end > arena_floats || r.range.end <= r.range.begin)
      return fmt::format("{}: range [{}, {}) of {} lies outside the arena [0, {}) or is empty", r.file, r.range.begin,
                         r.range.end, kind, arena_floats);
    if (r.range.begin > covered)
      return fmt::format("range [{}, {}) of {} is in no rank file (damaged checkpoint)", covered, r.range.begin, kind);
    if (r.range.begin < covered)
      return fmt::format("range [{}, {}) of {} is written twice, by {} and {} (damaged checkpoint)", r.range.begin,
                         std::min(covered, r.range.end), kind, last->file, r.file);
    covered = r.range.end;
    last = &r;
  }
  if (covered < arena_floats)
    return fmt::format("range [{}, {}) of {} is in no rank file (damaged checkpoint)", covered, arena_floats, kind);
  return {};
}

nlohmann::json ShardLayout::to_json() const {
  nlohmann::json params = nlohmann::json::array();
  for (const Param& p : table)
    params.push_back({{"name", p.name}, {"shape", p.shape}, {"offset", p.offset}, {"numel", p.numel}});
  nlohmann::json listed = nlohmann::json::object();
  for (const auto& [file, kinds] : files) {
    nlohmann::json by_kind = nlohmann::json::object();
    for (const auto& [kind, ranges] : kinds) {
      nlohmann::json pairs = nlohmann::json::array();
      for (const FloatRange& r : ranges) pairs.push_back({r.begin, r.end});
      by_kind[kind] = pairs;
    }
    listed[file] = by_kind;
  }
  nlohmann::json json = {{"format", std::string(kLayoutFormat)},
                         {"version", kLayoutVersion},
                         {"arena_floats", arena_floats},
                         {"table", params},
                         {"files", listed}};
  if (rank_state_world > 0) json["rank_state"] = {{"world", rank_state_world}, {"files", rank_state_files}};
  return json;
}

ShardLayout ShardLayout::from_json(const nlohmann::json& json, const std::filesystem::path& path) {
  const auto bad = [&](const std::string& what) { return InputError(kShardLayoutComponent, path.string() + ": " + what); };
  ShardLayout layout;
  try {
    if (!json.is_object() || json.value("format", "") != kLayoutFormat)
      throw bad("not a flotilla sharded checkpoint layout");
    if (json.at("version") != kLayoutVersion)
      throw bad(fmt::format("format version {}, this build reads {}", json.at("version").dump(), kLayoutVersion));
    layout.arena_floats = json.at("arena_floats").get<int64_t>();
    for (const nlohmann::json& p : json.at("table"))
      layout.table.push_back(Param{p.at("name").get<std::string>(), p.at("shape").get<std::vector<int64_t>>(),
                                   p.at("offset").get<int64_t>(), p.at("numel").get<int64_t>()});
    for (const auto& [file, kinds] : json.at("files").items()) {
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        throw bad(fmt::format("names a bad file '{}'", file));
      FileRanges& by_kind = layout.files[file];
      for (const auto& [kind, pairs] : kinds.items()) {
        std::vector<FloatRange>& ranges = by_kind[kind];
        for (const nlohmann::json& pair : pairs) {
          if (!pair.is_array() || pair.size() != 2) throw bad(fmt::format("{}: a range of {} is not [begin, end]", file, kind));
          ranges.push_back({pair[0].get<int64_t>(), pair[1].get<int64_t>()});
        }
      }
    }
    if (json.contains("rank_state")) {
      layout.rank_state_world = json["rank_state"].at("world").get<int64_t>();
      layout.rank_state_files = json["rank_state"].at("files").get<std::vector<std::string>>();
      if (layout.rank_state_world < 1 || static_cast<int64_t>(layout.rank_state_files.size()) != layout.rank_state_world)
        throw bad("rank_state: a world of " + std::to_string(layout.rank_state_world) + " ranks names " +
                  std::to_string(layout.rank_state_files.size()) + " files");
      for (const std::string& file : layout.rank_state_files)
        if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
          throw bad(fmt::format("rank_state names a bad file '{}'", file));
    }
  } catch (const nlohmann::json::exception& e) {
    throw bad("malformed: " + json_error_text(e));
  }
  if (layout.arena_floats < 0) throw bad("negative arena_floats");
  return layout;
}

std::string ShardLayout::check_coverage(std::span<const std::string_view> kinds) const {
  for (const auto& [file, by_kind] : files)
    for (const auto& [kind, ranges] : by_kind) {
      const std::string problem = check_ascending(ranges);
      if (!problem.empty()) return fmt::format("{}: {}: {} of {}", kShardLayoutFile, file, problem, kind);
    }
  for (std::string_view kind : kinds) {
    std::vector<OwnedRange> owned;
    for (const auto& [file, by_kind] : files) {
      const auto it = by_kind.find(std::string(kind));
      if (it == by_kind.end()) continue;
      for (const FloatRange& r : it->second) owned.push_back({file, r});
    }
    const std::string problem = check_tiling(kind, arena_floats, std::move(owned));
    if (!problem.empty()) return std::string(kShardLayoutFile) + ": " + problem;
  }
  return {};
}

}  // namespace flotilla::io
