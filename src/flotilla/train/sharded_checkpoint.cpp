#include "flotilla/train/sharded_checkpoint.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <memory>
#include <optional>
#include <utility>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/model/tensor_parallel.hpp"
#include "flotilla/parallel/pipeline_sync.hpp"
#include "flotilla/train/checkpoint.hpp"
#include "flotilla/train/host_checkpoints.hpp"

namespace flotilla::train {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kShardedCheckpointComponent = "train/sharded_checkpoint";
constexpr std::array<std::string_view, 3> kKinds = {"weights", "m", "v"};

std::vector<io::FloatRange> float_ranges(const std::vector<FlatRange>& ranges) {
  std::vector<io::FloatRange> out;
  for (const FlatRange& r : ranges) out.push_back({r.begin, r.end});
  return out;
}

io::ShardLayout::Param layout_param(const model::ParamInfo& info) {
  return {info.name, info.shape, info.offset, info.numel};
}

nlohmann::json ranges_json(const std::vector<io::FloatRange>& ranges) {
  nlohmann::json pairs = nlohmann::json::array();
  for (const io::FloatRange& r : ranges) pairs.push_back({r.begin, r.end});
  return pairs;
}

// A rank's outcome of a phase, as the text the ranks exchange: "" when it went well.
std::string first_failure(const std::vector<std::string>& outcomes) {
  for (size_t r = 0; r < outcomes.size(); ++r)
    if (!outcomes[r].empty()) return fmt::format("rank {}: {}", r, outcomes[r]);
  return {};
}

nlohmann::json read_json(const fs::path& path) {
  try {
    return nlohmann::json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(kShardedCheckpointComponent, fmt::format("{}: not valid JSON: {}", path.string(), json_error_text(e)));
  }
}

// The layout of `step_dir`, checked against the model's trainable table: InputError
// naming layout.json and the tensor that differs.
io::ShardLayout layout_for_model(const fs::path& step_dir, const model::ParamTable& table, int64_t arena_floats) {
  const fs::path path = step_dir / io::kShardLayoutFile;
  io::ShardLayout layout = io::ShardLayout::from_json(read_json(path), path);
  const auto bad = [&](const std::string& what) { return InputError(kShardedCheckpointComponent, path.string() + ": " + what); };
  for (const io::ShardLayout::Param& p : layout.table) {
    const model::ParamInfo* info = table.find(p.name);
    if (!info) throw bad(fmt::format("holds tensor '{}', which this model does not have (was it written for another model?)", p.name));
    if (info->shape != p.shape)
      throw bad(fmt::format("tensor '{}' has shape {}, the model's is {}", p.name, io::format_shape(p.shape),
                            io::format_shape(info->shape)));
    if (info->offset != p.offset || info->numel != p.numel)
      throw bad(fmt::format("tensor '{}' lies at [{}, {}) of the arena, the model's at [{}, {})", p.name, p.offset,
                            p.offset + p.numel, info->offset, info->offset + info->numel));
  }
  for (const model::ParamInfo& info : table.params())
    if (std::none_of(layout.table.begin(), layout.table.end(), [&](const auto& p) { return p.name == info.name; }))
      throw bad(fmt::format("has no tensor '{}' (was it written for another model?)", info.name));
  if (layout.arena_floats != arena_floats)
    throw bad(fmt::format("an arena of {} floats, the model's has {}", layout.arena_floats, arena_floats));
  const std::string problem = layout.check_coverage(kKinds);
  if (!problem.empty()) throw InputError(kShardedCheckpointComponent, step_dir.string() + ": " + problem);
  return layout;
}

// The rank files of `layout`, opened, each kind's tensor checked against its ranges.
std::vector<std::unique_ptr<io::SafetensorsFile>> open_rank_files(const fs::path& step_dir,
                                                                  const io::ShardLayout& layout) {
  std::vector<std::unique_ptr<io::SafetensorsFile>> files;
  for (const auto& [name, by_kind] : layout.files) {
    auto st = std::make_unique<io::SafetensorsFile>(step_dir / name);
    for (const auto& [kind, ranges] : by_kind) {
      const io::TensorEntry& e = st->at(kind);
      const int64_t want = io::total_floats(ranges);
      if (e.dtype != DType::f32 || e.shape.size() != 1 || e.shape[0] != want)
        throw InputError(kShardedCheckpointComponent, fmt::format("{}: tensor '{}' is {} {}, its ranges in {} need F32 [{}]",
                                                 st->path().string(), kind, dtype_name(e.dtype),
                                                 io::format_shape(e.shape), io::kShardLayoutFile, want));
    }
    files.push_back(std::move(st));
  }
  return files;
}

std::span<const float> floats(const io::TensorEntry& e) {
  return {reinterpret_cast<const float*>(e.bytes.data()), e.bytes.size() / sizeof(float)};
}

// Copies `kind` of every rank file into `dst`, which holds the floats of `dst_ranges`.
void copy_kind(const io::ShardLayout& layout, const std::vector<std::unique_ptr<io::SafetensorsFile>>& files,
               const std::string& kind, std::span<const io::FloatRange> dst_ranges, std::span<float> dst) {
  size_t i = 0;
  for (const auto& [name, by_kind] : layout.files) {
    const io::SafetensorsFile& st = *files[i++];
    const auto it = by_kind.find(kind);
    if (it == by_kind.end()) continue;
    io::copy_overlap(it->second, floats(st.at(kind)), dst_ranges, dst);
  }
}

// Tensor parallelism: a checkpoint is the full model's, its table, offsets and arena those
// of one rank's model, so that it resumes on any layout (one rank, dp, another tp). Each tp
// rank of the first replica writes its slices of the split tensors, tp rank 0 also the
// replicated tensors (the norms) and the alignment gaps between tensors (zeros), so that
// the files tile the arena; the other replicas (the same weights) write nothing. A reader
// takes its own slices of the whole, wherever they were written.
//
// pp x tp: each stage's ranks write (and read) only the tensors their stage owns
// (parallel/pipeline_sync.hpp's stage_owned_ranges over the full table: a tensor with the
// gap after it), world rank 0 also the gap before the first; the other stages' tensors are
// none of theirs.
//
// A *run* is one contiguous piece of a tensor this rank holds: `n` floats at `full` in the
// checkpoint's arena and at `local` in this rank's trainable arena (model/tensor_parallel.hpp's
// slice_ranges, in order). Its moments lie where the optimizer keeps the local floats it
// owns (for_each_piece): the whole arena under tp alone, a stage's tensors under pp x tp,
// a dp shard under ZeRO x tp.
struct SliceRun {
  int64_t full = 0, local = 0, n = 0;
};

struct TpCheckpointView {
  // The checkpoint's table: the full model's layout, or (LoRA) the whole adapters' table.
  std::unique_ptr<model::ParamLayout> full_layout;
  std::unique_ptr<model::LoraAdapters> full_adapters;
  const model::ParamTable* full = nullptr;
  std::vector<SliceRun> runs;              // this rank's tensors, replicated ones included, ascending `full`
  std::vector<io::FloatRange> needed;      // the runs' ranges, neighbours merged: what a reader copies
  std::vector<io::FloatRange> written;     // what this rank writes, neighbours merged
};

void append_merged(std::vector<io::FloatRange>& ranges, io::FloatRange r) {
  if (r.begin >= r.end) return;
  if (!ranges.empty() && ranges.back().end == r.begin)
    ranges.back().end = r.end;
  else
    ranges.push_back(r);
}

// What of [0, total) none of `taken` covers (in any order), ascending and merged: the
// floats a rank writes so that the rank files tile the arena (the gaps between tensors,
// or under tensor parallelism everything the other tp ranks do not write).
std::vector<io::FloatRange> uncovered(std::vector<io::FloatRange> taken, int64_t total) {
  std::sort(taken.begin(), taken.end(), [](const io::FloatRange& a, const io::FloatRange& b) { return a.begin < b.begin; });
  std::vector<io::FloatRange> out;
  int64_t from = 0;
  for (const io::FloatRange& t : taken) {
    append_merged(out, {from, t.begin});
    from = std::max(from, t.end);
  }
  append_merged(out, {from, total});
  return out;
}

// The split tensors' ranges of the full arena that tp rank `at` holds (ascending, merged).
std::vector<io::FloatRange> split_ranges(const model::ParamTable& full, const model::ParamTable& local,
                                         model::TpRank at) {
  std::vector<io::FloatRange> out;
  for (const model::ParamInfo& info : full.params()) {
    const model::ParamInfo& mine = *local.find(info.name);
    if (model::tensor_slice(info, mine) == model::TensorSlice::replicated) continue;
    for (const model::ElementRange& r : model::slice_ranges(info, mine, at)) append_merged(out, {r.begin, r.end});
  }
  return out;
}

// A buffer holding the floats of `ranges` (ascending) one after the other: where a
// full-arena offset lies in it.
class RangeBuffer {
 public:
  explicit RangeBuffer(std::span<const io::FloatRange> ranges) : ranges_(ranges) {
    int64_t at = 0;
    for (const io::FloatRange& r : ranges) {
      before_.push_back(at);
      at += r.size();
    }
  }
  // -1 when no range holds `at`.
  int64_t offset(int64_t at) const {
    const auto it = std::upper_bound(ranges_.begin(), ranges_.end(), at,
                                     [](int64_t x, const io::FloatRange& r) { return x < r.begin; });
    if (it == ranges_.begin() || at >= (it - 1)->end) return -1;
    const auto i = static_cast<size_t>(it - ranges_.begin() - 1);
    return before_[i] + (at - ranges_[i].begin);
  }

 private:
  std::span<const io::FloatRange> ranges_;
  std::vector<int64_t> before_;  // floats of the ranges before each
};

// The ranges of both (each ascending and merged) that overlap, ascending.
std::vector<io::FloatRange> intersect(std::span<const io::FloatRange> a, std::span<const io::FloatRange> b) {
  std::vector<io::FloatRange> out;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    append_merged(out, {std::max(a[i].begin, b[j].begin), std::min(a[i].end, b[j].end)});
    (a[i].end < b[j].end ? i : j)++;
  }
  return out;
}

// Null without tensor parallelism. `world_rank`: this rank in the world the checkpoint is
// written over (tp ranks adjacent, then the stages: the replica is world_rank / (tp pp)).
std::optional<TpCheckpointView> tp_checkpoint_view(Trainer& trainer, int world_rank) {
  model::Llama& model = trainer.model();
  const model::TensorParallelGroup* tp = model.tensor_parallel();
  if (!tp) return std::nullopt;
  const model::TpRank at{tp->tp_rank(), tp->tp_size()};
  TpCheckpointView v;
  // LoRA (on column-parallel layers): each B a range of output rows, A whole; the
  // adapters' slices are alike in size on every rank.
  model::LoraAdapters* lora = model.lora();
  if (lora) {
    v.full_adapters = std::make_unique<model::LoraAdapters>(model.full_config(), lora->config());
    v.full = &v.full_adapters->table();
  } else {
    v.full_layout = std::make_unique<model::ParamLayout>(model.full_config());
    v.full = v.full_layout.get();
  }
  const model::ParamTable& local = lora ? lora->table() : static_cast<const model::ParamTable&>(model.layout());
  // What this rank's stage owns of the full arena (all of it without a pipeline), and where
  // the optimizer keeps the moments of each local float.
  const parallel::PipelineStage* pipeline = trainer.pipeline();
  std::vector<io::FloatRange> stage_part = {{0, v.full->total_numel()}};
  if (pipeline) {
    const auto owned = parallel::stage_owned_ranges(model, *v.full, pipeline->ranges());
    std::vector<io::FloatRange> all, mine;
    for (const auto& stage : owned)
      for (const parallel::ArenaRange& r : stage) all.push_back({r.begin, r.end});
    if (pipeline->first()) mine = uncovered(all, v.full->total_numel());
    for (const parallel::ArenaRange& r : owned[static_cast<size_t>(pipeline->stage())]) mine.push_back({r.begin, r.end});
    std::sort(mine.begin(), mine.end(), [](const io::FloatRange& x, const io::FloatRange& y) { return x.begin < y.begin; });
    stage_part.clear();
    for (const io::FloatRange& r : mine) append_merged(stage_part, r);
  }
  for (const model::ParamInfo& info : v.full->params()) {
    // Every tensor the rank holds (a stage's, the tied embedding on the last too; LoRA: all
    // the adapters).
    const model::ParamInfo& mine = *local.find(info.name);
    if (pipeline && !lora && !model.holds(mine)) continue;
    int64_t at_local = mine.offset;
    for (const model::ElementRange& r : model::slice_ranges(info, mine, at)) {
      v.runs.push_back({r.begin, at_local, r.size()});
      at_local += r.size();
      append_merged(v.needed, {r.begin, r.end});
    }
  }
  const int stages = pipeline ? pipeline->stages() : 1;
  if (world_rank / (at.size * stages) != 0) return v;  // another replica: writes nothing
  if (at.rank != 0) {
    v.written = intersect(split_ranges(*v.full, local, at), stage_part);
    return v;
  }
  // tp rank 0: everything no other tp rank writes.
  std::vector<io::FloatRange> others;
  for (int r = 1; r < at.size; ++r) {
    if (lora) {
      for (const io::FloatRange& f : split_ranges(*v.full, local, {r, at.size})) others.push_back(f);
      continue;
    }
    const model::ParamLayout theirs(model::tensor_parallel_config(model.full_config(), {r, at.size}));
    for (const io::FloatRange& f : split_ranges(*v.full, theirs, {r, at.size})) others.push_back(f);
  }
  v.written = intersect(uncovered(std::move(others), v.full->total_numel()), stage_part);
  return v;
}

// How a run's floats meet two buffers: fn(buffer_at, local_at, n) for each piece of a run
// that lies both in `full_ranges` (checkpoint-arena ranges, ascending: the buffer's layout)
// and in `local_ranges` (local-arena ranges, ascending: the other side's layout, e.g. the
// whole arena for weights, the optimizer's owned ranges for its moments, which keeps their
// floats one after the other), with the offsets into each side's buffer. Floats of
// `full_ranges` no run holds (the gaps between tensors) are left as they are.
template <class Fn>
void for_each_piece(const TpCheckpointView& v, std::span<const io::FloatRange> full_ranges,
                    std::span<const io::FloatRange> local_ranges, Fn&& fn) {
  const RangeBuffer full_buffer(full_ranges), local_buffer(local_ranges);
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  // The range of `ranges` holding x (inside = true), else the next one's start (kNone: none).
  struct Reach {
    bool inside = false;
    int64_t to = 0;  // inside: the range's end; else the next range's start
  };
  auto reach = [](std::span<const io::FloatRange> ranges, int64_t x) {
    const auto it = std::upper_bound(ranges.begin(), ranges.end(), x,
                                     [](int64_t y, const io::FloatRange& r) { return y < r.end; });
    if (it == ranges.end()) return Reach{false, kNone};
    return it->begin <= x ? Reach{true, it->end} : Reach{false, it->begin};
  };
  for (const SliceRun& run : v.runs) {
    int64_t p = run.local;
    const int64_t end = run.local + run.n;
    while (p < end) {
      const int64_t f = run.full + (p - run.local);
      const Reach fr = reach(full_ranges, f), lr = reach(local_ranges, p);
      if (!fr.inside || !lr.inside) {  // on to where both may hold it
        const int64_t full_next = fr.inside ? p : fr.to == kNone ? end : run.local + (fr.to - run.full);
        const int64_t local_next = lr.inside ? p : std::min(lr.to, end);
        p = std::max({p + 1, full_next, local_next});
        continue;
      }
      const int64_t n = std::min({end - p, fr.to - f, lr.to - p});
      fn(full_buffer.offset(f), local_buffer.offset(p), n);
      p += n;
    }
  }
}

// What this (dp, tp) rank writes of a ZeRO x tp checkpoint: of what its tp rank writes
// (`v.written`, as the first replica's would), the floats whose local preimage this dp rank
// solely owns, and on dp rank 0 also the floats no tensor covers (alignment gaps), so that
// the rank files still tile the arena.
std::vector<io::FloatRange> zero_tp_written(const TpCheckpointView& v, std::span<const io::FloatRange> sole_owned,
                                            bool dp_root) {
  std::vector<io::FloatRange> pieces, covered;
  for (const SliceRun& run : v.runs) {
    covered.push_back({run.full, run.full + run.n});
    const auto first = std::partition_point(sole_owned.begin(), sole_owned.end(),
                                            [&](const io::FloatRange& o) { return o.end <= run.local; });
    for (auto o = first; o != sole_owned.end() && o->begin < run.local + run.n; ++o) {
      const int64_t b = std::max(o->begin, run.local), e = std::min(o->end, run.local + run.n);
      pieces.push_back({run.full + (b - run.local), run.full + (e - run.local)});
    }
  }
  if (dp_root)
    for (const io::FloatRange& gap : uncovered(covered, v.full->total_numel())) pieces.push_back(gap);
  std::sort(pieces.begin(), pieces.end(), [](const io::FloatRange& a, const io::FloatRange& b) { return a.begin < b.begin; });
  // Of those, what this tp rank writes (both lists ascending and disjoint).
  std::vector<io::FloatRange> mine;
  size_t w = 0;
  for (const io::FloatRange& r : pieces) {
    while (w < v.written.size() && v.written[w].end <= r.begin) ++w;
    for (size_t k = w; k < v.written.size() && v.written[k].begin < r.end; ++k)
      append_merged(mine, {std::max(r.begin, v.written[k].begin), std::min(r.end, v.written[k].end)});
  }
  return mine;
}

// The gradient codec's state when this run compresses gradients across ranks; else none.
std::vector<comm::CodecState> this_codec_state(Trainer& trainer) {
  parallel::DataParallel* dp = trainer.data_parallel();
  if (!dp || dp->world() < 2 || dp->codec().kind() == comm::Compression::none) return {};
  return dp->codec_state();
}

}  // namespace

std::string rank_file_name(int rank) { return fmt::format("rank-{:05d}.safetensors", rank); }
std::string rank_state_file_name(int rank) { return fmt::format("rank-{:05d}.state.safetensors", rank); }

std::vector<io::FloatRange> equal_cut(int64_t arena_floats, int rank, int world) {
  const int64_t begin = arena_floats * rank / world, end = arena_floats * (rank + 1) / world;
  if (begin >= end) return {};
  return {{begin, end}};
}

// A pipeline stage's writes, `world_rank` in the whole world the checkpoint is written over:
// the first replica's stages write the ranges they own (each trainable float is one
// stage's), world rank 0 also what no stage owns (the alignment gaps between tensors,
// zeros), so that the files tile the arena; the other replicas (the same weights) write
// nothing. The checkpoint is then the whole model's, as one rank's: it resumes on any
// layout, each rank reading what it holds.
// Under ZeRO-1 each replica writes the part of its stage's ranges it solely owns.
std::vector<io::FloatRange> pipeline_checkpoint_ranges(Trainer& trainer, int world_rank) {
  const parallel::DataParallel* replicas = trainer.data_parallel();
  const bool zero = parallel::pipeline_zero_sharded(trainer.sync());
  if (replicas && replicas->rank() != 0 && !zero) return {};
  std::vector<io::FloatRange> out;
  for (const parallel::ArenaRange& r : trainer.sync().sole_owned()) out.push_back({r.begin, r.end});
  if (world_rank != 0) return out;
  model::Llama& model = trainer.model();
  const model::Llama::Trainable trainable = model.trainable();
  const auto arena_floats = static_cast<int64_t>(trainable.params.size());
  std::vector<io::FloatRange> owned_somewhere;
  for (const auto& stage : parallel::stage_owned_ranges(model, trainable.table, trainer.pipeline()->ranges()))
    for (const parallel::ArenaRange& r : stage) owned_somewhere.push_back({r.begin, r.end});
  for (const io::FloatRange& gap : uncovered(std::move(owned_somewhere), arena_floats)) out.push_back(gap);
  std::sort(out.begin(), out.end(), [](const io::FloatRange& a, const io::FloatRange& b) { return a.begin < b.begin; });
  return out;
}

std::vector<io::FloatRange> checkpoint_ranges(Trainer& trainer, int rank, int world) {
  if (trainer.pipeline()) return pipeline_checkpoint_ranges(trainer, rank);
  const parallel::GradientSync& sync = trainer.sync();
  if (!sync.sharded())
    return equal_cut(static_cast<int64_t>(trainer.model().trainable().params.size()), rank, world);
  std::vector<io::FloatRange> out;
  for (const parallel::ArenaRange& r : sync.sole_owned()) out.push_back({r.begin, r.end});
  return out;
}

fs::path save_sharded_checkpoint(const fs::path& checkpoints_dir, Trainer& trainer, const data::BatchSource& source,
                                 nlohmann::json config, int keep, parallel::DataParallel* dp,
                                 const io::StepFiles& root_extra, const io::StepFiles& rank_extra,
                                 const RngStreams& rngs, const CheckpointHosts* hosts) {
  const int rank = dp ? dp->rank() : 0, world = dp ? dp->world() : 1;
  const bool root = rank == 0;
  const int64_t step = trainer.steps_done();
  const auto broadcast = [&](const std::string& text, std::string_view what) {
    return dp ? dp->broadcast_text(text, what) : text;
  };
  const auto gather = [&](const std::string& text, std::string_view what) {
    return dp ? dp->all_gather_text(text, what) : std::vector<std::string>{text};
  };
  const auto stop = [&](const std::string& why) {
    return RunStopped(kShardedCheckpointComponent, fmt::format("checkpoint of step {} not written: {}", step, why), 1, !root);
  };

  // Every rank's ranges, for rank 0's layout.json (under tensor or pipeline parallelism,
  // of the full model's arena: `dp` is then the whole world).
  std::optional<TpCheckpointView> tp = tp_checkpoint_view(trainer, rank);
  // ZeRO under tensor parallelism (stages 1-3; with pp, ZeRO-1 over each stage's dp
  // group): each tp slice's dp ranks split what its first replica would write, by the
  // local floats each solely owns (its moments are only those; under ZeRO-3 its weights
  // are only those too). A pipeline's sync is sharded without ZeRO too (each stage owns its
  // tensors): then only the first replica writes.
  const bool zero_tp = tp && trainer.sync().sharded() &&
                       (!trainer.pipeline() || parallel::pipeline_zero_sharded(trainer.sync()));
  if (zero_tp) {
    const model::TensorParallelGroup& group = *trainer.model().tensor_parallel();
    tp = tp_checkpoint_view(trainer, group.tp_rank());
    std::vector<io::FloatRange> sole;
    for (const parallel::ArenaRange& r : trainer.sync().sole_owned()) sole.push_back({r.begin, r.end});
    tp->written = zero_tp_written(*tp, sole, trainer.data_parallel()->rank() == 0);
  }
  const std::vector<io::FloatRange> mine = tp ? tp->written : checkpoint_ranges(trainer, rank, world);
  const std::vector<std::string> all_ranges = gather(ranges_json(mine).dump(), "checkpoint ranges");

  // This rank's files (rank 0's also the folder's shared files), built before any folder
  // is begun; what they hold is kept alive here until they are written.
  const model::Llama::Trainable trainable = trainer.model().trainable();
  const int64_t n = io::total_floats(mine);
  const std::vector<io::FloatRange> arena = {{0, static_cast<int64_t>(trainable.params.size())}};
  std::vector<float> weights, m, v;
  std::vector<parallel::RankState> own_state;
  std::vector<comm::CodecState> codec_state;
  io::StepFiles files;
  size_t own_count = 0;  // files.names[0, own_count): this rank's own; the rest rank 0's shared files
  std::string build_error;
  try {
    const std::vector<io::FloatRange> owned = float_ranges(trainer.optimizer().owned());
    weights.resize(static_cast<size_t>(n));
    m.resize(static_cast<size_t>(n));
    v.resize(static_cast<size_t>(n));
    if (tp) {
      // The pieces of this rank's runs that it writes (zeros in the gaps between tensors).
      auto copy_out = [&](std::span<const io::FloatRange> local_ranges, std::span<const float> from, std::vector<float>& to) {
        for_each_piece(*tp, mine, local_ranges, [&](int64_t at, int64_t local_at, int64_t count) {
          std::copy_n(from.begin() + local_at, count, to.begin() + at);
        });
      };
      copy_out(arena, trainable.params, weights);
      copy_out(owned, trainer.optimizer().m(), m);
      copy_out(owned, trainer.optimizer().v(), v);
    } else {
      io::copy_overlap(arena, trainable.params, mine, weights);
      io::copy_overlap(owned, trainer.optimizer().m(), mine, m);
      io::copy_overlap(owned, trainer.optimizer().v(), mine, v);
    }
    // Every rank runs the same mode: each has state, or none has.
    own_state = trainer.rank_state();
    // A lossy codec's error feedback and position (comm::GradientCodec::save_state), kept
    // alive here while the file is written.
    codec_state = this_codec_state(trainer);
    for (comm::CodecState& s : codec_state) own_state.push_back({"codec." + s.name, s.values});
    files.names = {rank_file_name(rank)};
    if (!own_state.empty()) files.names.push_back(rank_state_file_name(rank));
    files.names.insert(files.names.end(), rank_extra.names.begin(), rank_extra.names.end());
    own_count = files.names.size();
    if (root) {
      files.names.insert(files.names.end(), {std::string(io::kShardLayoutFile), std::string(kCheckpointStateFile),
                                             std::string(kCheckpointConfigFile)});
      files.names.insert(files.names.end(), root_extra.names.begin(), root_extra.names.end());
    }
    files.write = [&](const fs::path& dir) {
      const std::vector<io::TensorToWrite> tensors = {
          {"weights", {n}, weights.data()}, {"m", {n}, m.data()}, {"v", {n}, v.data()}};
      io::write_safetensors(dir / rank_file_name(rank), tensors, DType::f32, {{"format", "flotilla-checkpoint"}});
      if (!own_state.empty()) {
        std::vector<io::TensorToWrite> state;
        for (const parallel::RankState& s : own_state)
          state.push_back({s.name, {static_cast<int64_t>(s.data.size())}, s.data.data()});
        io::write_safetensors(dir / rank_state_file_name(rank), state, DType::f32,
                              {{"format", "flotilla-checkpoint"}, {"world", std::to_string(world)}});
      }
      if (rank_extra.write) rank_extra.write(dir);
      if (!root) return;
      io::ShardLayout layout;
      layout.arena_floats = tp ? tp->full->total_numel() : arena[0].end;
      for (const model::ParamInfo& info : tp ? tp->full->params() : trainable.table.params())
        layout.table.push_back(layout_param(info));
      for (int r = 0; r < world; ++r) {
        std::vector<io::FloatRange> ranges;
        for (const nlohmann::json& pair : nlohmann::json::parse(all_ranges[static_cast<size_t>(r)]))
          ranges.push_back({pair[0].get<int64_t>(), pair[1].get<int64_t>()});
        for (std::string_view kind : kKinds) layout.files[rank_file_name(r)][std::string(kind)] = ranges;
      }
      if (!own_state.empty()) {
        layout.rank_state_world = world;
        for (int r = 0; r < world; ++r) layout.rank_state_files.push_back(rank_state_file_name(r));
      }
      write_file_atomic(dir / io::kShardLayoutFile, layout.to_json().dump(1) + "\n");
      write_file_atomic(dir / kCheckpointStateFile, training_state_json(trainer, source, rngs).dump(2) + "\n");
      write_file_atomic(dir / kCheckpointConfigFile, config.dump(2) + "\n");
      if (root_extra.write) root_extra.write(dir);
    };
  } catch (const std::exception& e) {
    build_error = e.what();
  }
  // Hosts that share no folder: each keeps its own copy (train/host_checkpoints.hpp).
  if (hosts && hosts->per_host && dp)
    return save_step_on_hosts(*hosts, step, files, own_count, build_error, keep, *dp);

  // Rank 0 begins the folder; its name, or why not, goes to every rank ("!" + why).
  std::string begun;
  if (root) {
    try {
      begun = io::begin_step_folder(checkpoints_dir, step).string();
    } catch (const std::exception& e) {
      begun = std::string("!") + e.what();
    }
  }
  begun = broadcast(begun, "checkpoint folder");
  if (begun.starts_with("!")) throw stop("rank 0: " + begun.substr(1));
  const fs::path tmp_dir = begun;

  // Every rank writes its file (rank 0 the folder's shared files too) and sends back the
  // checksums, or why it could not.
  std::string written;
  try {
    if (!build_error.empty()) throw Error(kShardedCheckpointComponent, build_error);
    nlohmann::json entries = nlohmann::json::array();
    for (const io::FileEntry& e : io::write_step_files(tmp_dir, files))
      entries.push_back({e.name, e.bytes, e.crc32c});
    written = entries.dump();
  } catch (const std::exception& e) {
    written = std::string("!") + e.what();
  }
  const std::vector<std::string> all_written = gather(written, "checkpoint files");

  // Rank 0 commits with every rank's entries, or removes the folder; everyone learns which.
  std::string outcome;
  if (root) {
    std::vector<std::string> failures(all_written.size());
    std::vector<io::FileEntry> entries;
    for (size_t r = 0; r < all_written.size(); ++r) {
      if (all_written[r].starts_with("!")) {
        failures[r] = all_written[r].substr(1);
        continue;
      }
      for (const nlohmann::json& e : nlohmann::json::parse(all_written[r]))
        entries.push_back({e[0].get<std::string>(), e[1].get<uint64_t>(), e[2].get<uint32_t>()});
    }
    outcome = first_failure(failures);
    if (!outcome.empty()) {
      io::abandon_step_folder(tmp_dir);
      outcome = "!" + outcome;
    } else {
      try {
        outcome = io::commit_step_folder(checkpoints_dir, tmp_dir, step, entries, keep).string();
      } catch (const std::exception& e) {
        outcome = std::string("!rank 0: ") + e.what();
      }
    }
  }
  outcome = broadcast(outcome, "checkpoint outcome");
  if (outcome.starts_with("!")) throw stop(outcome.substr(1));
  return outcome;
}

bool is_sharded_checkpoint(const fs::path& step_dir) {
  std::error_code ec;
  return fs::is_regular_file(step_dir / io::kShardLayoutFile, ec);
}

std::string check_sharded_folder(const fs::path& step_dir, const std::vector<std::string>& listed) {
  const auto is_listed = [&](std::string_view name) {
    return std::find(listed.begin(), listed.end(), name) != listed.end();
  };
  for (std::string_view required : {io::kShardLayoutFile, kCheckpointStateFile, kCheckpointConfigFile})
    if (!is_listed(required)) return fmt::format("{}: does not list {}", io::kCheckpointManifestFile, required);
  try {
    const fs::path path = step_dir / io::kShardLayoutFile;
    const io::ShardLayout layout = io::ShardLayout::from_json(read_json(path), path);
    for (const auto& [name, by_kind] : layout.files)
      if (!is_listed(name))
        return fmt::format("{}: names {}, which the manifest does not list (missing rank file)", io::kShardLayoutFile,
                           name);
    for (const std::string& name : layout.rank_state_files)
      if (!is_listed(name))
        return fmt::format("{}: names {}, which the manifest does not list (missing rank file)", io::kShardLayoutFile,
                           name);
    std::string problem = layout.check_coverage(kKinds);
    if (!problem.empty()) return problem;
    open_rank_files(step_dir, layout);
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

void read_sharded_tensors(const fs::path& step_dir, Trainer& trainer) {
  if (trainer.model().tensor_parallel()) {
    // This rank's slices of the full model's arena, from whichever files hold them (the
    // world rank matters only to what a rank writes).
    const std::optional<TpCheckpointView> tp = tp_checkpoint_view(trainer, 0);
    const model::Llama::Trainable trainable = trainer.model().trainable();
    const io::ShardLayout layout = layout_for_model(step_dir, *tp->full, tp->full->total_numel());
    const auto files = open_rank_files(step_dir, layout);
    std::vector<float> buffer(static_cast<size_t>(io::total_floats(tp->needed)));
    const std::pair<std::string, std::span<float>> kinds[] = {
        {"weights", trainable.params}, {"m", trainer.optimizer().m()}, {"v", trainer.optimizer().v()}};
    // The weights at their local offsets; the moments of the floats the optimizer owns, one
    // after the other.
    const std::vector<io::FloatRange> arena = {{0, static_cast<int64_t>(trainable.params.size())}};
    const std::vector<io::FloatRange> owned = float_ranges(trainer.optimizer().owned());
    for (const auto& [kind, local] : kinds) {
      copy_kind(layout, files, kind, tp->needed, buffer);
      for_each_piece(*tp, tp->needed, kind == "weights" ? arena : owned, [&](int64_t at, int64_t local_at, int64_t count) {
        std::copy_n(buffer.begin() + at, count, local.begin() + local_at);
      });
    }
    return;
  }
  const model::Llama::Trainable trainable = trainer.model().trainable();
  const auto arena_floats = static_cast<int64_t>(trainable.params.size());
  const io::ShardLayout layout = layout_for_model(step_dir, trainable.table, arena_floats);
  const auto files = open_rank_files(step_dir, layout);
  // Everything is checked: now the copies. The whole weights; the moments of what this
  // rank's optimizer owns (its new shard under ZeRO, computed from this run's world).
  const std::vector<io::FloatRange> arena = {{0, arena_floats}};
  const std::vector<io::FloatRange> owned = float_ranges(trainer.optimizer().owned());
  const model::Llama& model = trainer.model();
  if (model.base_frozen() || model.holds_all()) {
    copy_kind(layout, files, "weights", arena, trainable.params);
  } else {
    // A model holding a part (an expert-parallel rank's experts): only that part is read,
    // the rest never written (its pages never resident).
    for (const model::ElementRange& r : model.held_ranges())
      copy_kind(layout, files, "weights", std::vector<io::FloatRange>{{r.begin, r.end}},
                trainable.params.subspan(static_cast<size_t>(r.begin), static_cast<size_t>(r.size())));
  }
  copy_kind(layout, files, "m", owned, trainer.optimizer().m());
  copy_kind(layout, files, "v", owned, trainer.optimizer().v());
}

void read_rank_state(const fs::path& step_dir, Trainer& trainer, const std::function<void(const std::string&)>& warn) {
  const int world = trainer.world();
  const std::vector<parallel::RankState> own_state = trainer.rank_state();
  const bool has_codec_state = !this_codec_state(trainer).empty();
  if (!is_sharded_checkpoint(step_dir)) return;
  const fs::path path = step_dir / io::kShardLayoutFile;
  const io::ShardLayout layout = io::ShardLayout::from_json(read_json(path), path);
  if (layout.rank_state_world == 0) return;  // written by a run without such state
  if (layout.rank_state_world != world) {
    if (warn && trainer.rank() == 0)
      warn(fmt::format("warning: the checkpoint's per-rank state (local SGD's optimizer moments and outer momentum, "
                       "compression's error feedback) was saved by {} ranks and cannot map onto {}: it starts fresh "
                       "(the moments of the shared ranges, a zero outer momentum and residual), so this resume is "
                       "not exact",
                       layout.rank_state_world, world));
    return;
  }
  if (own_state.empty() && !has_codec_state) return;  // this run keeps no such state (another mode: its config differs)
  const int rank = trainer.rank();
  const io::SafetensorsFile st(step_dir / layout.rank_state_files[static_cast<size_t>(rank)]);
  // Every tensor checked before any is copied. One this run has and the writer had not
  // (a DiLoCo outer momentum where the writer had none) starts fresh, said in a line.
  std::string absent;
  for (const parallel::RankState& s : own_state) {
    const io::TensorEntry* e = st.find(s.name);
    if (!e) {
      absent += (absent.empty() ? "" : ", ") + s.name;
    } else if (e->dtype != DType::f32 || e->bytes.size() != s.data.size_bytes()) {
      throw InputError(kShardedCheckpointComponent, fmt::format("{}: tensor '{}' is {} {}, this run's is F32 [{}]", st.path().string(),
                                               s.name, dtype_name(e->dtype), io::format_shape(e->shape),
                                               s.data.size()));
    }
  }
  std::vector<comm::CodecState> codec_state;
  for (const io::TensorEntry& e : st.tensors())
    if (e.name.starts_with("codec.")) {
      const std::span<const float> saved = floats(e);
      codec_state.push_back({e.name.substr(6), std::vector<float>(saved.begin(), saved.end())});
    }
  if (has_codec_state && codec_state.empty()) absent += (absent.empty() ? "" : ", ") + std::string("codec state");
  if (has_codec_state && !codec_state.empty()) {
    try {
      trainer.data_parallel()->restore_codec_state(codec_state);  // a part missing stops the run: InputError
    } catch (const InputError& e) {
      throw InputError(kShardedCheckpointComponent, st.path().string() + ": " + e.what());
    }
  }
  for (const parallel::RankState& s : own_state) {
    if (!st.find(s.name)) continue;
    const std::span<const float> saved = floats(st.at(s.name));
    std::copy(saved.begin(), saved.end(), s.data.begin());
  }
  if (!absent.empty() && warn && trainer.rank() == 0)
    warn(fmt::format("warning: {} holds no {}: started fresh", st.path().filename().string(), absent));
}

ConsolidatedWeights read_checkpoint_weights(const fs::path& step_dir) {
  ConsolidatedWeights out;
  if (!is_sharded_checkpoint(step_dir)) {
    const io::SafetensorsFile st(step_dir / kCheckpointWeightsFile);
    for (const io::TensorEntry& e : st.tensors()) {
      if (e.dtype != DType::f32)
        throw InputError(kShardedCheckpointComponent, fmt::format("{}: tensor '{}' is {}, expected F32", st.path().string(), e.name,
                                                 dtype_name(e.dtype)));
      const std::span<const float> values = floats(e);
      out.layout.table.push_back({e.name, e.shape, static_cast<int64_t>(out.arena.size()),
                                  static_cast<int64_t>(values.size())});
      out.arena.insert(out.arena.end(), values.begin(), values.end());
    }
    out.layout.arena_floats = static_cast<int64_t>(out.arena.size());
    return out;
  }
  const fs::path path = step_dir / io::kShardLayoutFile;
  out.layout = io::ShardLayout::from_json(read_json(path), path);
  const std::string problem = out.layout.check_coverage(kKinds);
  if (!problem.empty()) throw InputError(kShardedCheckpointComponent, step_dir.string() + ": " + problem);
  for (const io::ShardLayout::Param& p : out.layout.table)
    if (p.offset < 0 || p.numel < 0 || p.offset + p.numel > out.layout.arena_floats)
      throw InputError(kShardedCheckpointComponent, fmt::format("{}: tensor '{}' lies outside the arena", path.string(), p.name));
  const auto files = open_rank_files(step_dir, out.layout);
  out.arena.resize(static_cast<size_t>(out.layout.arena_floats));
  const std::vector<io::FloatRange> arena = {{0, out.layout.arena_floats}};
  copy_kind(out.layout, files, "weights", arena, out.arena);
  return out;
}

std::span<const float> ConsolidatedWeights::tensor(std::string_view name, std::span<const int64_t> shape,
                                                   const fs::path& step_dir) const {
  const auto it = std::find_if(layout.table.begin(), layout.table.end(), [&](const auto& p) { return p.name == name; });
  if (it == layout.table.end())
    throw InputError(kShardedCheckpointComponent, fmt::format("{}: the checkpoint has no tensor '{}' (was it written for another model?)",
                                             step_dir.string(), name));
  if (!std::equal(it->shape.begin(), it->shape.end(), shape.begin(), shape.end()))
    throw InputError(kShardedCheckpointComponent, fmt::format("{}: tensor '{}' has shape {}, the model's is {}", step_dir.string(), name,
                                             io::format_shape(it->shape), io::format_shape(shape)));
  return std::span<const float>(arena).subspan(static_cast<size_t>(it->offset), static_cast<size_t>(it->numel));
}

}  // namespace flotilla::train
