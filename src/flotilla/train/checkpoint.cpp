#include "flotilla/train/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cctype>
#include <charconv>
#include <cstring>
#include <unordered_set>

#include <fmt/format.h>

#include "flotilla/base/crc32c.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/io/safetensors.hpp"

namespace flotilla::train {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kComponent = "train/checkpoint";
constexpr std::string_view kStateFormat = "flotilla-checkpoint";
constexpr std::string_view kManifestFormat = "flotilla-checkpoint-manifest";
constexpr int kFormatVersion = 1;

// ---- Small file-system helpers ------------------------------------------------------------

void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_errno(kComponent, "cannot open " + dir.string() + " to fsync it");
  const int rc = ::fsync(fd);
  ::close(fd);
  // Some filesystems refuse fsync on directories (EINVAL): nothing more can be done there.
  if (rc != 0 && errno != EINVAL) throw_errno(kComponent, "fsync of " + dir.string() + " failed");
}

std::string trim(std::string s) {
  const auto not_space = [](unsigned char ch) { return !std::isspace(ch); };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

// "step-000120.tmp-4711" (a write in progress or killed), "step-000120.replaced-4711" (an
// older folder of the same step, moved aside) and "latest.tmp.4711": never checkpoints.
bool is_leftover_name(std::string_view name) {
  if (name.starts_with("latest.tmp.")) return true;  // write_file_atomic's temporary for `latest`
  const size_t dot = name.find('.');
  if (dot == std::string_view::npos || !parse_checkpoint_dir_name(name.substr(0, dot))) return false;
  const std::string_view rest = name.substr(dot + 1);
  return rest.starts_with("tmp-") || rest.starts_with("replaced-");
}

void remove_leftovers(const fs::path& checkpoints_dir, const fs::path& keep) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir, ec)) {
    if (entry.path() == keep || !is_leftover_name(entry.path().filename().string())) continue;
    std::error_code ignored;  // a folder we cannot remove is still never read
    fs::remove_all(entry.path(), ignored);
  }
}

// (step, folder) of every step folder, highest step first.
std::vector<std::pair<int64_t, fs::path>> list_step_dirs(const fs::path& checkpoints_dir) {
  std::vector<std::pair<int64_t, fs::path>> dirs;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir, ec)) {
    if (!entry.is_directory(ec)) continue;
    if (const auto step = parse_checkpoint_dir_name(entry.path().filename().string()))
      dirs.emplace_back(*step, entry.path());
  }
  std::sort(dirs.begin(), dirs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return dirs;
}

void write_tensors(const fs::path& path, const std::vector<CheckpointTensor>& tensors) {
  std::vector<io::TensorToWrite> out;
  out.reserve(tensors.size());
  for (const CheckpointTensor& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (numel != static_cast<int64_t>(t.data.size()))
      throw Error(kComponent, fmt::format("tensor '{}': shape {} but {} floats", t.name, io::format_shape(t.shape),
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
      throw InputError(kComponent, fmt::format("{}: has no tensor '{}' (was it written for another model?)", file,
                                               t.name));
    if (e->shape != t.shape)
      throw InputError(kComponent, fmt::format("{}: tensor '{}' has shape {}, the model's is {}", file, t.name,
                                               io::format_shape(e->shape), io::format_shape(t.shape)));
    if (e->dtype != DType::f32)
      throw InputError(kComponent,
                       fmt::format("{}: tensor '{}' is {}, expected F32", file, t.name, dtype_name(e->dtype)));
  }
  for (const io::TensorEntry& e : st.tensors())
    if (!expected.contains(e.name))
      throw InputError(kComponent,
                       fmt::format("{}: holds tensor '{}', which this model does not have", file, e.name));
}

void copy_tensors(const io::SafetensorsFile& st, std::vector<CheckpointTensor>& tensors) {
  for (CheckpointTensor& t : tensors) std::memcpy(t.data.data(), st.at(t.name).bytes.data(), t.data.size_bytes());
}

nlohmann::json read_json(const fs::path& path) {
  try {
    return nlohmann::json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(kComponent, fmt::format("{}: not valid JSON: {}", path.string(), json_error_text(e)));
  }
}

// A float as the shortest decimal that reads back as the same float (0.9f is 0.9, not
// 0.8999999761581421), so that config.json and trainer_state.json read as they were set.
double json_float(float f) { return std::stod(fmt::format("{}", f)); }

// One line about what is wrong with `name` in `dir` against its manifest entry; empty if
// nothing is.
std::string verify_file(const fs::path& dir, const std::string& name, const nlohmann::json& entry) {
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
    return fmt::format("{}: lists a bad file name '{}'", kCheckpointManifestFile, name);
  if (!entry.is_object() || !entry.contains("bytes") || !entry["bytes"].is_number_unsigned() ||
      !entry.contains("crc32c") || !entry["crc32c"].is_string())
    return fmt::format("{}: the entry of {} needs \"bytes\" and \"crc32c\"", kCheckpointManifestFile, name);
  const fs::path path = dir / name;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return name + ": missing";
  const uint64_t want_bytes = entry["bytes"].get<uint64_t>();
  const uint64_t have_bytes = fs::file_size(path, ec);
  if (ec) return fmt::format("{}: cannot read its size: {}", name, ec.message());
  if (have_bytes != want_bytes)
    return fmt::format("{}: {} bytes, the manifest says {}{}", name, have_bytes, want_bytes,
                       have_bytes < want_bytes ? " (truncated)" : "");
  try {
    const std::string have_crc = crc32c_hex(crc32c_file(path).crc32c);
    if (have_crc != entry["crc32c"].get<std::string>())
      return fmt::format("{}: CRC-32C {} does not match the manifest's {} (corrupted)", name, have_crc,
                         entry["crc32c"].get<std::string>());
    if (name.ends_with(".safetensors")) {
      const io::SafetensorsFile st(path);
    } else if (name.ends_with(".json")) {
      if (!nlohmann::json::accept(read_text_file(path))) return name + ": not valid JSON";
    }
  } catch (const Error& e) {
    return name + ": " + e.what();
  }
  return {};
}

}  // namespace

// ---- Generic checkpoint folders -------------------------------------------------------

std::string checkpoint_dir_name(int64_t step) { return fmt::format("step-{:06d}", step); }

std::optional<int64_t> parse_checkpoint_dir_name(std::string_view name) {
  constexpr std::string_view prefix = "step-";
  if (!name.starts_with(prefix)) return std::nullopt;
  const std::string_view digits = name.substr(prefix.size());
  if (digits.size() < 6 || digits.size() > 18) return std::nullopt;
  int64_t step = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return step;
}

fs::path write_checkpoint(const fs::path& checkpoints_dir, const CheckpointContents& contents, int keep) {
  if (contents.step < 0) throw Error(kComponent, "cannot write a checkpoint of a negative step");
  if (!fs::is_directory(checkpoints_dir)) {
    fs::create_directories(checkpoints_dir);
    fsync_dir(checkpoints_dir.has_parent_path() ? checkpoints_dir.parent_path() : fs::path("."));
  }
  const std::string name = checkpoint_dir_name(contents.step);
  const fs::path final_dir = checkpoints_dir / name;
  const fs::path tmp_dir = checkpoints_dir / fmt::format("{}.tmp-{}", name, ::getpid());
  remove_leftovers(checkpoints_dir, {});

  // Removes the half-written folder if anything below throws.
  struct TmpGuard {
    fs::path dir;
    ~TmpGuard() {
      if (dir.empty()) return;
      std::error_code ignored;
      fs::remove_all(dir, ignored);
    }
  } guard{tmp_dir};
  fs::create_directory(tmp_dir);

  // Every file is fsynced by the writer (temp file, fsync, rename, fsync of tmp_dir).
  write_tensors(tmp_dir / kCheckpointWeightsFile, contents.weights);
  write_tensors(tmp_dir / kCheckpointOptimizerFile, contents.optimizer);
  write_file_atomic(tmp_dir / kCheckpointStateFile, contents.state.dump(2) + "\n");
  write_file_atomic(tmp_dir / kCheckpointConfigFile, contents.config.dump(2) + "\n");
  if (contents.write_extra) contents.write_extra(tmp_dir);
  // The manifest checksums what is on disk, read back, rather than what we meant to write.
  nlohmann::json files = nlohmann::json::object();
  std::vector<std::string> names = {std::string(kCheckpointWeightsFile), std::string(kCheckpointOptimizerFile),
                                    std::string(kCheckpointStateFile), std::string(kCheckpointConfigFile)};
  names.insert(names.end(), contents.extra_files.begin(), contents.extra_files.end());
  for (const std::string& file : names) {
    const FileChecksum sum = crc32c_file(tmp_dir / file);
    files[std::string(file)] = {{"bytes", sum.bytes}, {"crc32c", crc32c_hex(sum.crc32c)}};
  }
  const nlohmann::json manifest = {{"format", std::string(kManifestFormat)},
                                   {"version", kFormatVersion},
                                   {"step", contents.step},
                                   {"files", files}};
  write_file_atomic(tmp_dir / kCheckpointManifestFile, manifest.dump(2) + "\n");

  // A folder of this step from an earlier, abandoned history (or a corrupt one) is moved
  // aside, not deleted first, so that some complete folder exists at every moment.
  fs::path replaced;
  if (fs::exists(final_dir)) {
    replaced = checkpoints_dir / fmt::format("{}.replaced-{}", name, ::getpid());
    fs::remove_all(replaced);
    fs::rename(final_dir, replaced);
  }
  fs::rename(tmp_dir, final_dir);
  guard.dir.clear();
  fsync_dir(checkpoints_dir);
  write_file_atomic(checkpoints_dir / kCheckpointLatestFile, name + "\n");
  if (!replaced.empty()) fs::remove_all(replaced);

  if (keep > 0) {
    const auto dirs = list_step_dirs(checkpoints_dir);
    for (size_t i = static_cast<size_t>(keep); i < dirs.size(); ++i)
      if (dirs[i].second != final_dir) fs::remove_all(dirs[i].second);
  }
  return final_dir;
}

std::string verify_checkpoint(const fs::path& step_dir) {
  const fs::path manifest_path = step_dir / kCheckpointManifestFile;
  std::error_code ec;
  if (!fs::is_regular_file(manifest_path, ec)) return std::string(kCheckpointManifestFile) + ": missing";
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(read_text_file(manifest_path));
  } catch (const nlohmann::json::exception&) {
    return std::string(kCheckpointManifestFile) + ": not valid JSON";
  } catch (const Error& e) {
    return std::string(kCheckpointManifestFile) + ": " + e.what();
  }
  // A manifest of the wrong shape is a damaged checkpoint, never an exception.
  try {
    if (!manifest.is_object() || !manifest.contains("format") || manifest["format"] != std::string(kManifestFormat) ||
        !manifest.contains("files") || !manifest["files"].is_object() || !manifest.contains("step") ||
        !manifest["step"].is_number_integer())
      return std::string(kCheckpointManifestFile) + ": not a flotilla checkpoint manifest";
    if (!manifest.contains("version") || manifest["version"] != kFormatVersion)
      return fmt::format("{}: format version {}, this build reads {}", kCheckpointManifestFile,
                         manifest.value("version", nlohmann::json()).dump(), kFormatVersion);
    const auto folder_step = parse_checkpoint_dir_name(step_dir.filename().string());
    if (folder_step && *folder_step != manifest["step"].get<int64_t>())
      return fmt::format("{}: step {} does not match the folder's name", kCheckpointManifestFile,
                         manifest["step"].get<int64_t>());
    const nlohmann::json& files = manifest["files"];
    for (std::string_view required : {kCheckpointWeightsFile, kCheckpointOptimizerFile, kCheckpointStateFile,
                                      kCheckpointConfigFile})
      if (!files.contains(std::string(required)))
        return fmt::format("{}: does not list {}", kCheckpointManifestFile, required);
    for (const auto& [name, entry] : files.items()) {
      std::string problem = verify_file(step_dir, name, entry);
      if (!problem.empty()) return problem;
    }
  } catch (const nlohmann::json::exception& e) {
    return fmt::format("{}: malformed: {}", kCheckpointManifestFile, json_error_text(e));
  }
  return {};
}

ResumePoint find_resume_point(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec))
    throw InputError(kComponent, path.string() + ": no such folder to resume from");
  const auto step_of = [](const fs::path& dir) {
    return read_json(dir / kCheckpointManifestFile).at("step").get<int64_t>();
  };

  // One step folder, named by the user: it must be good.
  if (fs::is_regular_file(path / kCheckpointManifestFile, ec) || parse_checkpoint_dir_name(path.filename().string())) {
    const std::string problem = verify_checkpoint(path);
    if (!problem.empty())
      throw InputError(kComponent, fmt::format("{}: unusable checkpoint: {}", path.string(), problem));
    return ResumePoint{path, step_of(path), {}};
  }

  fs::path checkpoints_dir = path / "checkpoints";
  if (!fs::is_directory(checkpoints_dir, ec)) checkpoints_dir = path;
  remove_leftovers(checkpoints_dir, {});
  const auto dirs = list_step_dirs(checkpoints_dir);
  const fs::path latest_path = checkpoints_dir / kCheckpointLatestFile;
  if (dirs.empty() && !fs::exists(latest_path, ec))
    throw InputError(kComponent, path.string() + ": no checkpoints to resume from (no checkpoints/ folder, "
                                                 "`latest` or step-* folders)");

  ResumePoint point;
  std::vector<fs::path> candidates;
  if (fs::is_regular_file(latest_path, ec)) {
    std::string latest;
    try {
      latest = trim(read_text_file(latest_path));
    } catch (const Error& e) {
      point.skipped.push_back(std::string(kCheckpointLatestFile) + ": " + e.what());
    }
    if (!latest.empty() && !parse_checkpoint_dir_name(latest)) {
      point.skipped.push_back(fmt::format("{}: '{}' is not a step folder's name", kCheckpointLatestFile, latest));
    } else if (!latest.empty() && !fs::is_directory(checkpoints_dir / latest, ec)) {
      point.skipped.push_back(fmt::format("{}: names {}, which does not exist", kCheckpointLatestFile, latest));
    } else if (!latest.empty()) {
      candidates.push_back(checkpoints_dir / latest);
    }
  } else {
    point.skipped.push_back(fmt::format("{}: missing", kCheckpointLatestFile));
  }
  for (const auto& [step, dir] : dirs)
    if (candidates.empty() || dir != candidates.front()) candidates.push_back(dir);

  for (const fs::path& dir : candidates) {
    const std::string problem = verify_checkpoint(dir);
    if (problem.empty()) {
      point.dir = dir;
      point.step = step_of(dir);
      return point;
    }
    point.skipped.push_back(dir.filename().string() + "/" + problem);
  }
  std::string why;
  for (const std::string& s : point.skipped) why += (why.empty() ? "" : "; ") + s;
  throw InputError(kComponent, fmt::format("{}: no usable checkpoint ({})", checkpoints_dir.string(), why));
}

void read_checkpoint(const fs::path& step_dir, CheckpointContents& into) {
  const io::SafetensorsFile weights(step_dir / kCheckpointWeightsFile);
  const io::SafetensorsFile optimizer(step_dir / kCheckpointOptimizerFile);
  // Both files are checked before either is copied: a mismatch leaves `into` untouched.
  check_tensors(weights, into.weights);
  check_tensors(optimizer, into.optimizer);
  nlohmann::json state = read_json(step_dir / kCheckpointStateFile);
  nlohmann::json config = read_json(step_dir / kCheckpointConfigFile);
  const fs::path manifest_path = step_dir / kCheckpointManifestFile;
  const nlohmann::json manifest = read_json(manifest_path);
  if (!manifest.contains("step") || !manifest["step"].is_number_integer())
    throw InputError(kComponent, manifest_path.string() + ": no integer \"step\"");
  copy_tensors(weights, into.weights);
  copy_tensors(optimizer, into.optimizer);
  into.state = std::move(state);
  into.config = std::move(config);
  into.step = manifest["step"].get<int64_t>();
}

// ---- A Trainer's checkpoint ------------------------------------------------------------

nlohmann::json train_config_json(const TrainConfig& cfg) {
  return {{"batch_size", cfg.batch_size},
          {"seq_len", cfg.seq_len},
          {"grad_accum", cfg.grad_accum},
          {"steps", cfg.steps},
          {"lr", json_float(cfg.lr)},
          {"min_lr", json_float(cfg.min_lr)},
          {"warmup_steps", cfg.warmup_steps},
          {"grad_clip", json_float(cfg.grad_clip)},
          {"adamw",
           {{"beta1", json_float(cfg.adamw.beta1)},
            {"beta2", json_float(cfg.adamw.beta2)},
            {"eps", json_float(cfg.adamw.eps)},
            {"weight_decay", json_float(cfg.adamw.weight_decay)}}},
          {"eval_every", cfg.eval_every},
          {"eval_batches", cfg.eval_batches}};
}

CheckpointContents capture_training_state(Trainer& trainer, const data::BatchSource& source,
                                          nlohmann::json config, const RngStreams& rngs) {
  CheckpointContents c;
  c.step = trainer.steps_done();
  // What the optimizer updates: every parameter in full training, the adapters in a LoRA
  // run. The moments share the table's offsets (under ZeRO, once gathered: Trainer::whole_moments).
  const auto [m, v] = trainer.whole_moments();
  const model::Llama::Trainable trainable = trainer.model().trainable();
  const auto view = [](std::span<float> buffer, const model::ParamInfo& info) {
    return buffer.subspan(static_cast<size_t>(info.offset), static_cast<size_t>(info.numel));
  };
  if (m.size() != trainable.params.size())
    throw Error(kComponent, "the optimizer's state does not match the trainable parameters");
  for (const model::ParamInfo& info : trainable.table.params())
    c.weights.push_back({info.name, info.shape, view(trainable.params, info)});
  for (const model::ParamInfo& info : trainable.table.params())
    c.optimizer.push_back({"m." + info.name, info.shape, view(m, info)});
  for (const model::ParamInfo& info : trainable.table.params())
    c.optimizer.push_back({"v." + info.name, info.shape, view(v, info)});

  const TrainConfig& cfg = trainer.config();
  const CosineSchedule& schedule = trainer.schedule();
  nlohmann::json streams = nlohmann::json::object();
  for (const auto& [name, stream] : rngs) {
    const Rng::State st = stream->state();
    streams[name] = {st.s[0], st.s[1], st.s[2], st.s[3]};
  }
  // LoRA dropout masks are a hash of (seed, forward count): the count is its whole state.
  const nlohmann::json rng = {{"dropout_step", trainer.model().dropout_step()}, {"streams", streams}};
  c.state = {{"format", std::string(kStateFormat)},
             {"version", kFormatVersion},
             {"step", c.step},
             {"elapsed_s", trainer.elapsed_s()},
             {"optimizer",
              {{"kind", "adamw"},
               {"step", trainer.optimizer().steps_taken()},
               {"beta1", json_float(cfg.adamw.beta1)},
               {"beta2", json_float(cfg.adamw.beta2)},
               {"eps", json_float(cfg.adamw.eps)},
               {"weight_decay", json_float(cfg.adamw.weight_decay)}}},
             {"schedule",
              {{"kind", "warmup_cosine"},
               {"peak_lr", json_float(schedule.peak_lr)},
               {"min_lr", json_float(schedule.min_lr)},
               {"warmup_steps", schedule.warmup_steps},
               {"total_steps", schedule.total_steps},
               {"position", c.step},
               {"next_lr", json_float(schedule.lr_at(c.step))}}},
             {"data", source.state()},
             {"rng", rng}};
  c.config = std::move(config);
  return c;
}

fs::path save_training_checkpoint(const fs::path& checkpoints_dir, Trainer& trainer, const data::BatchSource& source,
                                  nlohmann::json config, int keep, const RngStreams& rngs) {
  return write_checkpoint(checkpoints_dir, capture_training_state(trainer, source, std::move(config), rngs), keep);
}

nlohmann::json restore_training_state(const fs::path& step_dir, Trainer& trainer, data::BatchSource& source,
                                      const RngStreams& rngs) {
  CheckpointContents c = capture_training_state(trainer, source, {}, rngs);
  const fs::path state_path = step_dir / kCheckpointStateFile;
  // Check trainer_state.json before read_checkpoint overwrites the model.
  const nlohmann::json state = read_json(state_path);
  const auto bad = [&](const std::string& what) { return InputError(kComponent, state_path.string() + ": " + what); };
  int64_t step = 0, optimizer_step = 0;
  double elapsed_s = 0.0;
  try {
    if (state.at("format").get<std::string>() != kStateFormat || state.at("version") != kFormatVersion)
      throw bad("not a flotilla trainer state of version " + std::to_string(kFormatVersion));
    step = state.at("step").get<int64_t>();
    elapsed_s = state.at("elapsed_s").get<double>();
    const nlohmann::json& opt = state.at("optimizer");
    if (opt.at("kind") != "adamw") throw bad("optimizer is " + opt.at("kind").dump() + ", this trainer's is adamw");
    optimizer_step = opt.at("step").get<int64_t>();
    if (state.at("schedule").at("position").get<int64_t>() != step)
      throw bad("the schedule position differs from the step");
    if (!state.at("rng").at("dropout_step").is_number_unsigned())
      throw bad("rng.dropout_step must be a non-negative integer");
    const nlohmann::json& saved_rngs = state.at("rng").at("streams");
    for (const auto& [name, stream] : rngs)
      if (!saved_rngs.contains(name)) throw bad("has no state for the random stream '" + name + "'");
    for (const auto& [name, words] : saved_rngs.items()) {
      if (!rngs.contains(name)) throw bad("holds the random stream '" + name + "', which this run does not use");
      if (!words.is_array() || words.size() != 4) throw bad("random stream '" + name + "' must be 4 words");
    }
    if (!state.contains("data")) throw bad("has no data source state");
  } catch (const nlohmann::json::exception& e) {
    throw bad("malformed: " + json_error_text(e));
  }
  if (step < 0 || optimizer_step < 0) throw bad("negative step");

  read_checkpoint(step_dir, c);
  try {
    source.set_state(state.at("data"));
  } catch (const InputError& e) {
    throw InputError(kComponent, state_path.string() + ": data source: " + e.what());
  }
  trainer.model().set_dropout_step(state["rng"]["dropout_step"].get<uint64_t>());
  for (const auto& [name, stream] : rngs) {
    const nlohmann::json& words = state["rng"]["streams"][name];
    stream->set_state(Rng::State{{words[0].get<uint64_t>(), words[1].get<uint64_t>(), words[2].get<uint64_t>(),
                                  words[3].get<uint64_t>()}});
  }
  trainer.optimizer().set_steps_taken(optimizer_step);
  trainer.restore_progress(step, elapsed_s);
  return c.config;
}

std::vector<std::string> config_differences(const nlohmann::json& saved, const nlohmann::json& current) {
  const nlohmann::json a = saved.flatten(), b = current.flatten();
  std::map<std::string, std::pair<std::string, std::string>> diffs;
  const auto key = [](const std::string& pointer) {
    std::string k = pointer.substr(1);
    std::replace(k.begin(), k.end(), '/', '.');
    return k;
  };
  for (const auto& [p, v] : a.items())
    if (!b.contains(p) || b[p] != v) diffs[key(p)] = {v.dump(), b.contains(p) ? b[p].dump() : "(none)"};
  for (const auto& [p, v] : b.items())
    if (!a.contains(p)) diffs[key(p)] = {"(none)", v.dump()};
  std::vector<std::string> lines;
  for (const auto& [k, d] : diffs) lines.push_back(fmt::format("{}: {} -> {}", k, d.first, d.second));
  return lines;
}

}  // namespace flotilla::train
