// Checkpoints: a folder per optimizer step from which a run resumes exactly where it
// stopped, bit for bit. The folders are io/checkpoint_store.hpp's step folders (crash-safe
// writing, manifest, `latest`, keep-N, where to resume); this file says what a training
// checkpoint holds in one. train/training_state.hpp captures a Trainer into these files
// and restores it from them.
//
// A step folder holds:
//   weights.safetensors    the trainable tensors (F32): every parameter of the model, or
//                          its LoRA adapters when attached (Llama::trainable())
//   optimizer.safetensors  AdamW's moments, "m.<name>" and "v.<name>" (F32)
//   trainer_state.json     {"format": "flotilla-checkpoint", "version": 1, "step", "elapsed_s",
//                           "optimizer": {"kind": "adamw", "step", hyper-parameters},
//                           "schedule": {"kind": "warmup_cosine", ..., "position", "next_lr"},
//                           "data": BatchSource::state(),
//                           "rng": {"dropout_step": n (LoRA dropout's counter),
//                                   "streams": {"<name>": [4 words], ...}}}
//   config.json            the training configuration, for the record and for comparison
//   adapter_model.safetensors, adapter_config.json
//                          LoRA runs: the adapters in PEFT layout (CheckpointContents::extra_files)
//   manifest.json          the store's: byte size and CRC-32C of every file above
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/io/checkpoint_store.hpp"

namespace flotilla::train {

// ---- A checkpoint's files -------------------------------------------------------------

// A float32 tensor that a checkpoint saves from, or restores into, in place.
struct CheckpointTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::span<float> data;  // product(shape) floats
};

struct CheckpointContents {
  int64_t step = 0;                         // optimizer steps completed
  std::vector<CheckpointTensor> weights;    // the trainable tensors -> weights.safetensors
  std::vector<CheckpointTensor> optimizer;  // optimizer state -> optimizer.safetensors
  nlohmann::json state = nlohmann::json::object();   // -> trainer_state.json
  nlohmann::json config = nlohmann::json::object();  // -> config.json
  // Files besides those above, written into the step folder before its manifest and
  // checksummed with them: a LoRA run's adapter in PEFT layout, loadable as it is by
  // generate, fuse and --resume-adapter-file. write_extra writes the files `extra_files`
  // names into the folder it is given.
  std::vector<std::string> extra_files;
  std::function<void(const std::filesystem::path&)> write_extra;
};

inline constexpr std::string_view kCheckpointWeightsFile = "weights.safetensors";
inline constexpr std::string_view kCheckpointOptimizerFile = "optimizer.safetensors";
inline constexpr std::string_view kCheckpointStateFile = "trainer_state.json";
inline constexpr std::string_view kCheckpointConfigFile = "config.json";

// Writes `contents` as the store's step folder checkpoints_dir/step-N (created with its
// parents; an existing step-N is replaced), points `latest` at it and keeps the `keep`
// newest step folders (keep <= 0: all). Returns the step folder.
std::filesystem::path write_checkpoint(const std::filesystem::path& checkpoints_dir,
                                       const CheckpointContents& contents, int keep);

// Empty when `step_dir` is a complete checkpoint whose files all match its manifest
// (present, same byte size and CRC-32C, safetensors and JSON that parse); otherwise one
// line naming the file and what is wrong with it.
std::string verify_checkpoint(const std::filesystem::path& step_dir);

// Where to resume: io::find_resume_point with the four files above required of every step
// folder. `path` is a run's output folder (holding checkpoints/), a checkpoints folder, or
// one step folder. InputError when nothing usable is found.
io::ResumePoint find_resume_point(const std::filesystem::path& path);

// Reads the checkpoint in `step_dir` into `into`: its tensors are copied into the spans
// of into.weights and into.optimizer, whose names and shapes must be exactly those in the
// files (else InputError naming the file and the tensor, before anything is copied);
// into.step, into.state and into.config are replaced by the checkpoint's.
// Call verify_checkpoint first: this checks structure, not checksums.
void read_checkpoint(const std::filesystem::path& step_dir, CheckpointContents& into);

// The step folder's trainer_state.json, parsed (InputError naming it when it is not JSON):
// what a restore checks before read_checkpoint overwrites anything.
nlohmann::json read_checkpoint_state(const std::filesystem::path& step_dir);
// And its config.json.
nlohmann::json read_checkpoint_config(const std::filesystem::path& step_dir);

}  // namespace flotilla::train
