#include "flotilla/io/checkpoint_store.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <utility>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/crc32c.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/io/safetensors.hpp"

namespace flotilla::io {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kCheckpointStoreComponent = "io/checkpoint_store";
constexpr std::string_view kManifestFormat = "flotilla-checkpoint-manifest";
constexpr int kManifestVersion = 1;

// ---- Small file-system helpers ------------------------------------------------------------

void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_errno(kCheckpointStoreComponent, "cannot open " + dir.string() + " to fsync it");
  const int rc = ::fsync(fd);
  ::close(fd);
  // Some filesystems refuse fsync on directories (EINVAL): nothing more can be done there.
  if (rc != 0 && errno != EINVAL) throw_errno(kCheckpointStoreComponent, "fsync of " + dir.string() + " failed");
}

std::string trim(std::string s) {
  const auto not_space = [](unsigned char ch) { return !std::isspace(ch); };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

nlohmann::json read_json(const fs::path& path) {
  try {
    return nlohmann::json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(kCheckpointStoreComponent, fmt::format("{}: not valid JSON: {}", path.string(), json_error_text(e)));
  }
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
      const SafetensorsFile st(path);
    } else if (name.ends_with(".json")) {
      if (!nlohmann::json::accept(read_text_file(path))) return name + ": not valid JSON";
    }
  } catch (const Error& e) {
    return name + ": " + e.what();
  }
  return {};
}

nlohmann::json entries_json(std::span<const FileEntry> entries) {
  nlohmann::json out = nlohmann::json::object();
  for (const FileEntry& e : entries) out[e.name] = {{"bytes", e.bytes}, {"crc32c", crc32c_hex(e.crc32c)}};
  return out;
}

// {name: {bytes, crc32c}} back into entries (sorted by name); Error when malformed.
std::vector<FileEntry> entries_of(const nlohmann::json& files) {
  std::vector<FileEntry> out;
  for (const auto& [name, e] : files.items()) {
    const std::string hex = e.at("crc32c").get<std::string>();
    uint32_t crc = 0;
    const auto [end, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), crc, 16);
    if (ec != std::errc() || end != hex.data() + hex.size())
      throw Error(kCheckpointStoreComponent, fmt::format("{}: CRC-32C '{}' of {} is not hexadecimal", kCheckpointManifestFile, hex, name));
    out.push_back(FileEntry{name, e.at("bytes").get<uint64_t>(), crc});
  }
  std::sort(out.begin(), out.end(), [](const FileEntry& a, const FileEntry& b) { return a.name < b.name; });
  return out;
}

}  // namespace

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

fs::path begin_step_folder(const fs::path& checkpoints_dir, int64_t step) {
  if (step < 0) throw Error(kCheckpointStoreComponent, "cannot write a checkpoint of a negative step");
  if (!fs::is_directory(checkpoints_dir)) {
    fs::create_directories(checkpoints_dir);
    fsync_dir(checkpoints_dir.has_parent_path() ? checkpoints_dir.parent_path() : fs::path("."));
  }
  remove_leftovers(checkpoints_dir, {});
  const fs::path tmp_dir = checkpoints_dir / fmt::format("{}.tmp-{}", checkpoint_dir_name(step), ::getpid());
  fs::create_directory(tmp_dir);
  return tmp_dir;
}

std::vector<FileEntry> write_step_files(const fs::path& tmp_dir, const StepFiles& files) {
  if (files.write) files.write(tmp_dir);
  // The manifest checksums what is on disk, read back, rather than what we meant to write.
  std::vector<FileEntry> entries;
  for (const std::string& file : files.names) {
    const FileChecksum sum = crc32c_file(tmp_dir / file);
    entries.push_back(FileEntry{file, sum.bytes, sum.crc32c});
  }
  return entries;
}

void abandon_step_folder(const fs::path& tmp_dir) {
  std::error_code ignored;  // a folder we cannot remove is still never read
  fs::remove_all(tmp_dir, ignored);
}

fs::path commit_step_folder(const fs::path& checkpoints_dir, const fs::path& tmp_dir, int64_t step,
                            std::span<const FileEntry> entries, int keep, std::span<const FileEntry> checkpoint_files) {
  // Removes the half-written folder if anything below throws.
  struct TmpGuard {
    fs::path dir;
    ~TmpGuard() {
      if (!dir.empty()) abandon_step_folder(dir);
    }
  } guard{tmp_dir};
  const std::string name = checkpoint_dir_name(step);
  const fs::path final_dir = checkpoints_dir / name;
  nlohmann::json listed = nlohmann::json::object();
  for (const FileEntry& e : entries) {
    if (listed.contains(e.name)) throw Error(kCheckpointStoreComponent, fmt::format("{} is written twice into {}", e.name, name));
    listed[e.name] = {{"bytes", e.bytes}, {"crc32c", crc32c_hex(e.crc32c)}};
  }
  nlohmann::json manifest = {{"format", std::string(kManifestFormat)},
                             {"version", kManifestVersion},
                             {"step", step},
                             {"files", listed}};
  if (!checkpoint_files.empty()) manifest["checkpoint_files"] = entries_json(checkpoint_files);
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

fs::path write_step_folder(const fs::path& checkpoints_dir, int64_t step, const StepFiles& files, int keep) {
  const fs::path tmp_dir = begin_step_folder(checkpoints_dir, step);
  std::vector<FileEntry> entries;
  try {
    entries = write_step_files(tmp_dir, files);
  } catch (...) {
    abandon_step_folder(tmp_dir);
    throw;
  }
  return commit_step_folder(checkpoints_dir, tmp_dir, step, entries, keep);
}

namespace {

StepFolderCheck required_files_check(std::span<const std::string_view> required_files) {
  std::vector<std::string> required(required_files.begin(), required_files.end());
  return [required](const fs::path&, const std::vector<std::string>& listed) -> std::string {
    for (const std::string& name : required)
      if (std::find(listed.begin(), listed.end(), name) == listed.end())
        return fmt::format("{}: does not list {}", kCheckpointManifestFile, name);
    return {};
  };
}

}  // namespace

std::string verify_step_folder(const fs::path& step_dir, std::span<const std::string_view> required_files) {
  return verify_step_folder(step_dir, required_files_check(required_files));
}

std::string verify_step_folder(const fs::path& step_dir, const StepFolderCheck& check) {
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
    if (!manifest.contains("version") || manifest["version"] != kManifestVersion)
      return fmt::format("{}: format version {}, this build reads {}", kCheckpointManifestFile,
                         manifest.value("version", nlohmann::json()).dump(), kManifestVersion);
    const auto folder_step = parse_checkpoint_dir_name(step_dir.filename().string());
    if (folder_step && *folder_step != manifest["step"].get<int64_t>())
      return fmt::format("{}: step {} does not match the folder's name", kCheckpointManifestFile,
                         manifest["step"].get<int64_t>());
    const nlohmann::json& files = manifest["files"];
    std::vector<std::string> listed;
    for (const auto& [name, entry] : files.items()) listed.push_back(name);
    for (const auto& [name, entry] : files.items()) {
      std::string problem = verify_file(step_dir, name, entry);
      if (!problem.empty()) return problem;
    }
    if (check) {
      std::string problem = check(step_dir, listed);
      if (!problem.empty()) return problem;
    }
  } catch (const nlohmann::json::exception& e) {
    return fmt::format("{}: malformed: {}", kCheckpointManifestFile, json_error_text(e));
  }
  return {};
}

int64_t manifest_step(const fs::path& step_dir) {
  const fs::path manifest_path = step_dir / kCheckpointManifestFile;
  const nlohmann::json manifest = read_json(manifest_path);
  if (!manifest.contains("step") || !manifest["step"].is_number_integer())
    throw InputError(kCheckpointStoreComponent, manifest_path.string() + ": no integer \"step\"");
  return manifest["step"].get<int64_t>();
}

std::vector<HeldStep> list_held_steps(const fs::path& checkpoints_dir) {
  std::vector<HeldStep> steps;
  for (const auto& [step, dir] : list_step_dirs(checkpoints_dir)) {
    try {
      const nlohmann::json manifest = nlohmann::json::parse(read_text_file(dir / kCheckpointManifestFile));
      if (manifest.value("format", "") != kManifestFormat || manifest.value("version", 0) != kManifestVersion ||
          manifest.value("step", int64_t{-1}) != step || !manifest.contains("files") || !manifest["files"].is_object())
        continue;
      HeldStep held{step, dir, entries_of(manifest.contains("checkpoint_files") ? manifest["checkpoint_files"]
                                                                                : manifest["files"]),
                    {}};
      for (const auto& [name, entry] : manifest["files"].items())
        if (verify_file(dir, name, entry).empty()) held.held.push_back(name);
      std::sort(held.held.begin(), held.held.end());
      steps.push_back(std::move(held));
    } catch (const std::exception&) {
      continue;  // an unreadable manifest: the folder holds nothing usable
    }
  }
  return steps;
}

void add_to_step_folder(const fs::path& step_dir, std::span<const FileEntry> added) {
  const fs::path path = step_dir / kCheckpointManifestFile;
  nlohmann::json manifest = read_json(path);
  const std::vector<FileEntry> set =
      entries_of(manifest.contains("checkpoint_files") ? manifest["checkpoint_files"] : manifest["files"]);
  for (const FileEntry& e : added) {
    const auto it = std::find_if(set.begin(), set.end(), [&](const FileEntry& s) { return s.name == e.name; });
    if (it == set.end() || it->bytes != e.bytes || it->crc32c != e.crc32c)
      throw Error(kCheckpointStoreComponent, fmt::format("{}: {} ({} bytes, CRC-32C {}) is not a file of this checkpoint",
                                          step_dir.string(), e.name, e.bytes, crc32c_hex(e.crc32c)));
    manifest["files"][e.name] = {{"bytes", e.bytes}, {"crc32c", crc32c_hex(e.crc32c)}};
  }
  write_file_atomic(path, manifest.dump(2) + "\n");
}

ResumePoint find_resume_point(const fs::path& path, std::span<const std::string_view> required_files) {
  return find_resume_point(path, required_files_check(required_files));
}

ResumePoint find_resume_point(const fs::path& path, const StepFolderCheck& check) {
  std::error_code ec;
  if (!fs::is_directory(path, ec))
    throw InputError(kCheckpointStoreComponent, path.string() + ": no such folder to resume from");

  // One step folder, named by the user: it must be good.
  if (fs::is_regular_file(path / kCheckpointManifestFile, ec) || parse_checkpoint_dir_name(path.filename().string())) {
    const std::string problem = verify_step_folder(path, check);
    if (!problem.empty())
      throw InputError(kCheckpointStoreComponent, fmt::format("{}: unusable checkpoint: {}", path.string(), problem));
    return ResumePoint{path, manifest_step(path), {}};
  }

  fs::path checkpoints_dir = path / kCheckpointsDirName;
  if (!fs::is_directory(checkpoints_dir, ec)) checkpoints_dir = path;
  remove_leftovers(checkpoints_dir, {});
  const auto dirs = list_step_dirs(checkpoints_dir);
  const fs::path latest_path = checkpoints_dir / kCheckpointLatestFile;
  if (dirs.empty() && !fs::exists(latest_path, ec))
    throw InputError(kCheckpointStoreComponent, path.string() + ": no checkpoints to resume from (no checkpoints/ folder, "
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
    const std::string problem = verify_step_folder(dir, check);
    if (problem.empty()) {
      point.dir = dir;
      point.step = manifest_step(dir);
      return point;
    }
    point.skipped.push_back(dir.filename().string() + "/" + problem);
  }
  std::string why;
  for (const std::string& s : point.skipped) why += (why.empty() ? "" : "; ") + s;
  throw InputError(kCheckpointStoreComponent, fmt::format("{}: no usable checkpoint ({})", checkpoints_dir.string(), why));
}

}  // namespace flotilla::io
