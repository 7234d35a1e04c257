#include "flotilla/train/checkpoint.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <unordered_set>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/io/shard_layout.hpp"
#include "flotilla/train/sharded_checkpoint.hpp"

namespace flotilla::train {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kCheckpointComponent = "train/checkpoint";
// What every training checkpoint's step folder holds, in the order a manifest missing one
// names the first.
constexpr std::array<std::string_view, 4> kRequiredFiles = {kCheckpointWeightsFile, kCheckpointOptimizerFile,
                                                            kCheckpointStateFile, kCheckpointConfigFile};

void write_tensors(const fs::path& path, const std::vector<CheckpointTensor>& tensors) {
  std::vector<io::TensorToWrite> out;
  out.reserve(tensors.size());
  for (const CheckpointTensor& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (numel != static_cast<int64_t>(t.data.size()))
      throw Error(kCheckpointComponent, fmt::format("tensor '{}': shape {} but {} floats", t.name, io::format_shape(t.shape),
                                          t.data.size()));
    out.push_back(io::TensorToWrite{t.name, t.shape, t.data.data()});
  }
  io::write_safetensors(path, out, DType::f32, {{"format", "flotilla-checkpoint"}});
}

// InputError naming `st`'s file and the first tensor that is not in `tensors` with the
// same shape and dtype F32, or the other way round.
void check_tensors(const io::SafetensorsFile& st, const std::vector<CheckpointTensor>& tensors) {
  const std::string file = st.path().string();
  std::unordered_set<std::string_view> expected;
  for (const CheckpointTensor& t : tensors) {
    expected.insert(t.name);
    const io::TensorEntry* e = st.find(t.name);
    if (!e)
      throw InputError(kCheckpointComponent, fmt::format("{}: has no tensor '{}' (was it written for another model?)", file,
                                               t.name));
    if (e->shape != t.shape)
      throw InputError(kCheckpointComponent, fmt::format("{}: tensor '{}' has shape {}, the model's is {}", file, t.name,
                                               io::format_shape(e->shape), io::format_shape(t.shape)));
    if (e->dtype != DType::f32)
      throw InputError(kCheckpointComponent,
                       fmt::format("{}: tensor '{}' is {}, expected F32", file, t.name, dtype_name(e->dtype)));
  }
  for (const io::TensorEntry& e : st.tensors())
    if (!expected.contains(e.name))
      throw InputError(kCheckpointComponent,
                       fmt::format("{}: holds tensor '{}', which this model does not have", file, e.name));
}

void copy_tensors(const io::SafetensorsFile& st, std::vector<CheckpointTensor>& tensors) {
  for (CheckpointTensor& t : tensors) std::memcpy(t.data.data(), st.at(t.name).bytes.data(), t.data.size_bytes());
}

nlohmann::json read_json(const fs::path& path) {
  try {
    return nlohmann::json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(kCheckpointComponent, fmt::format("{}: not valid JSON: {}", path.string(), json_error_text(e)));
  }
}

}  // namespace

// ---- A checkpoint's files -------------------------------------------------------------

fs::path write_checkpoint(const fs::path& checkpoints_dir, const CheckpointContents& contents, int keep) {
  io::StepFiles files;
  files.names = {std::string(kCheckpointWeightsFile), std::string(kCheckpointOptimizerFile),
                 std::string(kCheckpointStateFile), std::string(kCheckpointConfigFile)};
  files.names.insert(files.names.end(), contents.extra_files.begin(), contents.extra_files.end());
  files.write = [&](const fs::path& dir) {
    // Every file is fsynced by its writer (temp file, fsync, rename, fsync of the folder).
    write_tensors(dir / kCheckpointWeightsFile, contents.weights);
    write_tensors(dir / kCheckpointOptimizerFile, contents.optimizer);
    write_file_atomic(dir / kCheckpointStateFile, contents.state.dump(2) + "\n");
    write_file_atomic(dir / kCheckpointConfigFile, contents.config.dump(2) + "\n");
    if (contents.write_extra) contents.write_extra(dir);
  };
  return io::write_step_folder(checkpoints_dir, contents.step, files, keep);
}

namespace {

// A sharded step folder (its manifest lists layout.json) or an unsharded one.
std::string check_step_folder(const fs::path& step_dir, const std::vector<std::string>& listed) {
  if (std::find(listed.begin(), listed.end(), io::kShardLayoutFile) != listed.end())
    return check_sharded_folder(step_dir, listed);
  for (std::string_view required : kRequiredFiles)
    if (std::find(listed.begin(), listed.end(), required) == listed.end())
      return fmt::format("{}: does not list {}", io::kCheckpointManifestFile, required);
  return {};
}

}  // namespace

std::string verify_checkpoint(const fs::path& step_dir) { return io::verify_step_folder(step_dir, check_step_folder); }

io::ResumePoint find_resume_point(const fs::path& path) { return io::find_resume_point(path, check_step_folder); }

void read_checkpoint(const fs::path& step_dir, CheckpointContents& into) {
  const io::SafetensorsFile weights(step_dir / kCheckpointWeightsFile);
  const io::SafetensorsFile optimizer(step_dir / kCheckpointOptimizerFile);
  // Both files are checked before either is copied: a mismatch leaves `into` untouched.
  check_tensors(weights, into.weights);
  check_tensors(optimizer, into.optimizer);
  nlohmann::json state = read_json(step_dir / kCheckpointStateFile);
  nlohmann::json config = read_json(step_dir / kCheckpointConfigFile);
  const int64_t step = io::manifest_step(step_dir);
  copy_tensors(weights, into.weights);
  copy_tensors(optimizer, into.optimizer);
  into.state = std::move(state);
  into.config = std::move(config);
  into.step = step;
}

nlohmann::json read_checkpoint_state(const fs::path& step_dir) { return read_json(step_dir / kCheckpointStateFile); }

nlohmann::json read_checkpoint_config(const fs::path& step_dir) { return read_json(step_dir / kCheckpointConfigFile); }

}  // namespace flotilla::train
