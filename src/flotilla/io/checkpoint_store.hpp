// A crash-safe store of step folders: how a checkpoint's folder is named, written, trusted
// and found again. It knows files, not what is in them: the caller writes a step's files
// into the folder it is handed, and says which files every step folder must hold
// (train/checkpoint.hpp is the training checkpoint built on it).
//
// Vocabulary:
//   checkpoints folder  OUT/checkpoints: the step folders and the `latest` pointer
//   step folder         step-000120/ (the step, at least six digits): one checkpoint,
//                       never modified once it has its name
//   latest              a text file "step-000120\n" naming the newest complete step folder
//   manifest            step-N/manifest.json: byte size and CRC-32C of every other file,
//                       {"format": "flotilla-checkpoint-manifest", "version": 1, "step",
//                        "files": {"<file>": {"bytes": n, "crc32c": "8 hex digits"}}}
//
// Writing is crash-safe: the files go into step-N.tmp-<pid>/, each fsynced, the manifest
// last; the folder is renamed to step-N and the checkpoints folder fsynced; only then is
// `latest` replaced (atomically). A kill at any moment leaves `latest` naming a complete
// checkpoint, or absent. Leftover tmp folders are never read, and are removed by the next
// save or resume.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flotilla::io {

inline constexpr std::string_view kCheckpointsDirName = "checkpoints";  // inside a run's output folder
inline constexpr std::string_view kCheckpointManifestFile = "manifest.json";
inline constexpr std::string_view kCheckpointLatestFile = "latest";

// "step-000120"; and back (nullopt for any other name, tmp folders included).
std::string checkpoint_dir_name(int64_t step);
std::optional<int64_t> parse_checkpoint_dir_name(std::string_view name);

// The files of one step folder: their names (the manifest lists exactly these) and what
// writes them into the folder it is given. Each file must be on disk when `write` returns
// (write_file_atomic and write_safetensors fsync theirs); the manifest checksums what is
// on disk, read back, rather than what was meant to be written.
struct StepFiles {
  std::vector<std::string> names;
  std::function<void(const std::filesystem::path& dir)> write;
};

// Writing one step folder from several processes (each rank writes its own files) is
// three calls, with the caller moving the few bytes between them (io/ knows no
// collectives; train/sharded_checkpoint.hpp does it over DataParallel):
//   rank 0       tmp = begin_step_folder(dir, step)     the name is sent to every rank
//   every rank   entries = write_step_files(tmp, its files)   gathered to rank 0
//   rank 0       commit_step_folder(dir, tmp, step, all entries, keep), or, when a rank
//                failed, abandon_step_folder(tmp)
// write_step_folder is the one-process composition.

// A fresh temporary step folder checkpoints_dir/step-N.tmp-<pid> (the checkpoints folder
// created with its parents; leftovers of killed writes removed).
std::filesystem::path begin_step_folder(const std::filesystem::path& checkpoints_dir, int64_t step);

struct FileEntry {
  std::string name;
  uint64_t bytes = 0;
  uint32_t crc32c = 0;
};

// Writes `files` into `tmp_dir` and returns their names, sizes and CRC-32C, read back from
// disk (so rank 0 need not read every rank's files to checksum them).
std::vector<FileEntry> write_step_files(const std::filesystem::path& tmp_dir, const StepFiles& files);

// The manifest of `entries` (every file of the folder: a name twice is an Error), the
// rename to step-N, `latest`, keep-N. Returns the step folder; `tmp_dir` is removed when
// anything fails. `checkpoint_files`: when the folder holds only part of a checkpoint
// (one host's folder, train/host_checkpoints.hpp), the checkpoint's complete file set,
// recorded in the manifest as "checkpoint_files" ({name: {bytes, crc32c}}) so that the
// folder knows what it lacks.
std::filesystem::path commit_step_folder(const std::filesystem::path& checkpoints_dir,
                                         const std::filesystem::path& tmp_dir, int64_t step,
                                         std::span<const FileEntry> entries, int keep,
                                         std::span<const FileEntry> checkpoint_files = {});

// Removes a temporary step folder that will not be committed (never throws).
void abandon_step_folder(const std::filesystem::path& tmp_dir);

// Writes `files` as checkpoints_dir/step-N (created with its parents; an existing step-N
// is replaced), points `latest` at it and keeps the `keep` newest step folders (keep <= 0:
// all). Returns the step folder.
std::filesystem::path write_step_folder(const std::filesystem::path& checkpoints_dir, int64_t step,
                                        const StepFiles& files, int keep);

// Empty when `step_dir` is a complete step folder: its manifest lists every one of
// `required_files`, and every file it lists matches it (present, same byte size and
// CRC-32C, safetensors and JSON that parse); otherwise one line naming the file and what
// is wrong with it.
std::string verify_step_folder(const std::filesystem::path& step_dir, std::span<const std::string_view> required_files);

// What the folder's user requires of it beyond matching its manifest (which files, and
// what they must say to each other): given the step folder, whose listed files have all
// matched the manifest, and the names the manifest lists, empty when it is usable,
// otherwise one line naming the file and the fault.
using StepFolderCheck =
    std::function<std::string(const std::filesystem::path& step_dir, const std::vector<std::string>& listed)>;
std::string verify_step_folder(const std::filesystem::path& step_dir, const StepFolderCheck& check);

// The step a step folder's manifest records. InputError naming the manifest when it
// cannot be read or has no integer "step".
int64_t manifest_step(const std::filesystem::path& step_dir);

struct ResumePoint {
  std::filesystem::path dir;          // the step folder to resume from
  int64_t step = 0;
  std::vector<std::string> skipped;   // one line per unusable candidate tried before it
};

// What one step folder holds of its checkpoint: the files its manifest lists that match it
// (present, same size and CRC-32C, parsing), and the checkpoint's complete set (the
// manifest's "checkpoint_files", or, in a folder that holds all of it, what it lists).
struct HeldStep {
  int64_t step = 0;
  std::filesystem::path dir;
  std::vector<FileEntry> checkpoint_files;  // sorted by name
  std::vector<std::string> held;            // sorted
};
// Every step folder of `checkpoints_dir` with a readable manifest, highest step first
// (leftover tmp folders of killed writes are never listed: they have no step folder's name).
std::vector<HeldStep> list_held_steps(const std::filesystem::path& checkpoints_dir);

// Lists `added` (files already written into the committed `step_dir`, fsynced) in its
// manifest, which is replaced atomically: at every moment the manifest lists only files
// that are there whole. Each added name must be in the checkpoint's set with that size
// and CRC-32C (else Error, the manifest untouched).
void add_to_step_folder(const std::filesystem::path& step_dir, std::span<const FileEntry> added);

// Where to resume. `path` is a run's output folder (holding checkpoints/), a checkpoints
// folder, or one step folder. In a checkpoints folder the step folder named by `latest`
// is tried first, then every step folder from the highest step down, until one verifies
// (verify_step_folder with `required_files`); each one skipped (and a missing or dangling
// `latest`) adds a line to `skipped`. A step folder named directly must verify.
// InputError when nothing usable is found.
ResumePoint find_resume_point(const std::filesystem::path& path, std::span<const std::string_view> required_files);
ResumePoint find_resume_point(const std::filesystem::path& path, const StepFolderCheck& check);

}  // namespace flotilla::io
