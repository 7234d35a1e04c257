// A Trainer's checkpoint: capturing everything a run needs to continue (weights,
// optimizer moments and step, schedule position, data order, random streams, elapsed
// time) as train/checkpoint.hpp's contents, and restoring it so that training continues
// bit for bit as if it had never stopped. Also the configuration a checkpoint records in
// config.json, and how a resumed run's configuration differs from it.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/rng.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/train/checkpoint.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::train {

// Named random streams saved beside the data source's state and the model's dropout
// counter. A stream is restored by name; a checkpoint and a run must have the same names.
using RngStreams = std::map<std::string, Rng*>;

// The training configuration as JSON (the "train" part of a checkpoint's config.json).
nlohmann::json train_config_json(const TrainConfig& cfg);

// trainer_state.json: the step and elapsed time, the optimizer's step and settings, the
// schedule position, `source`'s state, the model's dropout counter and the `rngs`.
nlohmann::json training_state_json(Trainer& trainer, const data::BatchSource& source, const RngStreams& rngs = {});

// An unsharded checkpoint (the format before sharded checkpoints, still read; written
// by save_training_checkpoint for one process): what resuming `trainer` needs, as views
// into its buffers: the trainable tensors (every
// parameter, or the LoRA adapters), AdamW's moments and step, the step and elapsed time,
// the schedule position, `source`'s state, the model's dropout counter, the `rngs`, and
// `config` for config.json. Error under ZeRO, whose ranks hold a shard of the moments
// (train/sharded_checkpoint.hpp writes those).
CheckpointContents capture_training_state(Trainer& trainer, const data::BatchSource& source,
                                          nlohmann::json config, const RngStreams& rngs = {});

// capture_training_state + write_checkpoint.
std::filesystem::path save_training_checkpoint(const std::filesystem::path& checkpoints_dir, Trainer& trainer,
                                               const data::BatchSource& source, nlohmann::json config,
                                               int keep, const RngStreams& rngs = {});

// Restores `trainer` (parameters, optimizer, step, elapsed time), `source` and `rngs` from
// the checkpoint in `step_dir`, sharded (this rank's part: any saved world and stage onto
// this one) or unsharded, so that training continues as if it had never stopped.
// The trainer's model must have the checkpoint's tensors (InputError naming the file
// otherwise). Returns the checkpoint's config.json.
// Per-rank state that cannot map onto this world (train/sharded_checkpoint.hpp
// read_rank_state) is said in one line to `warn`.
nlohmann::json restore_training_state(const std::filesystem::path& step_dir, Trainer& trainer,
                                      data::BatchSource& source, const RngStreams& rngs = {},
                                      const std::function<void(const std::string&)>& warn = {});

// "train.steps: 100 -> 200" for every leaf that differs between two configuration JSONs
// (keys present in only one included), in key order.
std::vector<std::string> config_differences(const nlohmann::json& saved, const nlohmann::json& current);

}  // namespace flotilla::train
