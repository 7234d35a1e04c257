// Sharded checkpoints (docs/sharded-checkpoints.md): every rank writes its own file of the
// trainable arena, and a checkpoint written by N ranks at any ZeRO stage resumes on M
// ranks at any stage, or on one.
//
// A sharded step folder (io/checkpoint_store.hpp's, with its manifest) holds:
//   rank-00000.safetensors ... rank-0000{N-1}.safetensors
//       1-D F32 tensors "weights", "m", "v": the rank's owned ranges of each, concatenated
//       in ascending order (io/shard_layout.hpp)
//   layout.json          the arena's size, its parameter table, each file's ranges per kind
//   trainer_state.json, config.json   rank 0's (train/checkpoint.hpp), as in an unsharded one
//   adapter_model.safetensors, adapter_config.json   LoRA runs, rank 0's
//
// Owners: under ZeRO a rank's shard exactly as parallel/zero.hpp cuts it, the units' tails
// rank 0's (GradientSync::sole_owned); otherwise the arena cut into N equal ranges; one
// rank is N = 1. The weights (the same on every rank) have the same owners as the
// moments, so each rank writes about 3P/N floats and nothing is gathered.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/data/text_dataset.hpp"
#include "flotilla/io/checkpoint_store.hpp"
#include "flotilla/io/shard_layout.hpp"
#include "flotilla/parallel/data_parallel.hpp"
#include "flotilla/train/trainer.hpp"
#include "flotilla/train/training_state.hpp"

namespace flotilla::train {

struct CheckpointHosts;  // train/host_checkpoints.hpp

// "rank-00003.safetensors"; and the file of its own state, "rank-00003.state.safetensors"
// (Trainer::rank_state: under local SGD its AdamW moments and outer momentum), written
// when there is any and restored on a world of the same size.
std::string rank_file_name(int rank);
std::string rank_state_file_name(int rank);

// [r P / N, (r+1) P / N): rank r's equal part of an arena of P floats (none when empty).
std::vector<io::FloatRange> equal_cut(int64_t arena_floats, int rank, int world);

// The ranges of the arena this rank writes: GradientSync::sole_owned() under ZeRO, else
// equal_cut over the world.
std::vector<io::FloatRange> checkpoint_ranges(Trainer& trainer, int rank, int world);

// Every rank calls it alike (a collective over `dp`; null: one process). Rank 0 begins
// the step folder, every rank writes its rank file and `rank_extra` (files of its own
// state, named for the rank), rank 0 also layout.json, trainer_state.json, config.json
// and `root_extra` (a LoRA run's adapter files), and
// commits the folder with every rank's checksums. When any rank fails, rank 0 removes the
// folder and every rank throws RunStopped (exit 1; quiet but on rank 0) naming the rank and
// the fault: nobody waits for a rank that will not come. Returns the step folder.
// `hosts` with per-host folders (train/host_checkpoints.hpp): each host's leader begins
// and commits its own copy in `hosts->dir` (`checkpoints_dir` is then unused), and every
// rank's files are also sent to its replicas; this host's step folder is returned.
std::filesystem::path save_sharded_checkpoint(const std::filesystem::path& checkpoints_dir, Trainer& trainer,
                                              const data::BatchSource& source, nlohmann::json config, int keep,
                                              parallel::DataParallel* dp, const io::StepFiles& root_extra = {},
                                              const io::StepFiles& rank_extra = {}, const RngStreams& rngs = {},
                                              const CheckpointHosts* hosts = nullptr);

// Whether `step_dir` is a sharded checkpoint (it holds layout.json).
bool is_sharded_checkpoint(const std::filesystem::path& step_dir);

// For io::verify_step_folder: empty when a step folder whose manifest lists `listed` is a
// usable sharded checkpoint: trainer_state.json and config.json listed, layout.json valid,
// every kind tiled exactly once, every file it names listed and holding its ranges'
// floats. Otherwise one line (which range is missing or written twice, which file).
std::string check_sharded_folder(const std::filesystem::path& step_dir, const std::vector<std::string>& listed);

// Copies this rank's part of a sharded checkpoint into `trainer`: the whole weights and
// the moments of the ranges its optimizer owns, from the overlap of each rank file's
// ranges (mmapped: only those pages are read). InputError naming layout.json and the
// tensor when the layout does not match the model, or naming the file when one is
// damaged, before anything is copied.
void read_sharded_tensors(const std::filesystem::path& step_dir, Trainer& trainer);

// After Trainer::restore_progress: this rank's own state (Trainer::rank_state) from its
// state file when the checkpoint was written by a world of this size. A checkpoint whose
// per-rank state was written by another world size cannot map onto the new ranks: one
// line to `warn` (rank 0), and the state stays as restore_progress left it (local SGD's
// moments those of the arena's ranges, each saved by its writer; the outer momentum zero).
void read_rank_state(const std::filesystem::path& step_dir, Trainer& trainer,
                     const std::function<void(const std::string&)>& warn);

// A consolidated copy of a checkpoint's trainable weights: the whole arena (arena_floats
// floats) and its table (the layout's; for an unsharded checkpoint, weights.safetensors'
// tensors one after the other). For `flotilla convert --checkpoint`: any number of ranks,
// any stage, or the unsharded format. InputError naming the file when it is damaged.
struct ConsolidatedWeights {
  io::ShardLayout layout;
  std::vector<float> arena;
  // The tensor `name` of the table, or InputError naming the checkpoint and the tensor
  // when it is absent or has another shape.
  std::span<const float> tensor(std::string_view name, std::span<const int64_t> shape,
                                const std::filesystem::path& step_dir) const;
};
ConsolidatedWeights read_checkpoint_weights(const std::filesystem::path& step_dir);

}  // namespace flotilla::train
