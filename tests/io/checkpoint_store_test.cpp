// The step-folder store as a specification, with plain files and no trainer: what a step
// folder and its manifest hold, the files a caller requires, a writer that fails midway,
// keep-N, and resuming past a damaged newest folder. (tests/train/checkpoint_test.cpp
// checks training checkpoints built on it.)
#include "flotilla/io/checkpoint_store.hpp"

#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "flotilla/base/crc32c.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "io_test_util.hpp"

namespace flotilla::io {
namespace {

namespace fs = std::filesystem;
using test_util::TempDir;

constexpr std::array<std::string_view, 1> kRequired = {"a.json"};

// Two small files whose contents say which step wrote them.
StepFiles two_files(int64_t step) {
  StepFiles files;
  files.names = {"a.json", "b.bin"};
  files.write = [step](const fs::path& dir) {
    write_file_atomic(dir / "a.json", nlohmann::json{{"step", step}}.dump());
    write_file_atomic(dir / "b.bin", "bytes of step " + std::to_string(step));
  };
  return files;
}

std::string latest_of(const fs::path& checkpoints) {
  std::string s = read_text_file(checkpoints / kCheckpointLatestFile);
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

TEST(CheckpointStore, StepFolderHoldsTheFilesAndAManifestOfTheirSizesAndChecksums) {
  TempDir dir;
  const fs::path checkpoints = dir / "checkpoints";
  const fs::path step_dir = write_step_folder(checkpoints, 7, two_files(7), 0);
  EXPECT_EQ(step_dir, checkpoints / "step-000007");
  EXPECT_EQ(latest_of(checkpoints), "step-000007");
  const auto manifest = nlohmann::json::parse(read_text_file(step_dir / kCheckpointManifestFile));
  EXPECT_EQ(manifest["format"], "flotilla-checkpoint-manifest");
  EXPECT_EQ(manifest["version"], 1);
  EXPECT_EQ(manifest["step"], 7);
  ASSERT_EQ(manifest["files"].size(), 2u);
  for (const char* name : {"a.json", "b.bin"}) {
    const FileChecksum sum = crc32c_file(step_dir / name);
    EXPECT_EQ(manifest["files"][name]["bytes"], sum.bytes) << name;
    EXPECT_EQ(manifest["files"][name]["crc32c"], crc32c_hex(sum.crc32c)) << name;
  }
  EXPECT_EQ(verify_step_folder(step_dir, kRequired), "");
  EXPECT_EQ(manifest_step(step_dir), 7);
  for (const auto& e : fs::directory_iterator(checkpoints))  // no temporary left behind
    EXPECT_TRUE(e.path().filename() == "latest" || e.path() == step_dir) << e.path();
}

TEST(CheckpointStore, AFolderWithoutARequiredFileIsRefusedByName) {
  TempDir dir;
  const fs::path step_dir = write_step_folder(dir.path(), 1, two_files(1), 0);
  constexpr std::array<std::string_view, 2> required = {"a.json", "weights.bin"};
  EXPECT_EQ(verify_step_folder(step_dir, required), "manifest.json: does not list weights.bin");
  try {
    find_resume_point(dir.path(), required);
    FAIL() << "resumed from a folder without weights.bin";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("does not list weights.bin"), std::string::npos) << e.what();
  }
}

TEST(CheckpointStore, AWriterThatFailsLeavesTheEarlierFoldersAndLatestAsTheyWere) {
  TempDir dir;
  write_step_folder(dir.path(), 1, two_files(1), 0);
  StepFiles failing = two_files(2);
  failing.write = [](const fs::path& folder) {
    write_file_atomic(folder / "a.json", "{}");
    throw std::runtime_error("disk full");
  };
  EXPECT_THROW(write_step_folder(dir.path(), 2, failing, 0), std::runtime_error);
  EXPECT_EQ(latest_of(dir.path()), "step-000001");
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_TRUE(e.path().filename() == "latest" || e.path().filename() == "step-000001") << e.path();
}

// The three calls one step folder is written by from several processes: each "rank" writes
// its own files into the folder rank 0 began, and rank 0 commits with everyone's entries.
TEST(CheckpointStore, SeveralWritersCommitOneFolderWithEveryonesFiles) {
  TempDir dir;
  const fs::path tmp = begin_step_folder(dir.path(), 3);
  EXPECT_TRUE(fs::is_directory(tmp));
  EXPECT_FALSE(parse_checkpoint_dir_name(tmp.filename().string())) << "a temporary name is never a step folder's";
  std::vector<FileEntry> entries = write_step_files(tmp, two_files(3));
  StepFiles other;
  other.names = {"rank-1.bin"};
  other.write = [](const fs::path& folder) { write_file_atomic(folder / "rank-1.bin", "the other rank"); };
  const std::vector<FileEntry> theirs = write_step_files(tmp, other);
  ASSERT_EQ(theirs.size(), 1u);
  EXPECT_EQ(theirs[0].bytes, 14u);
  EXPECT_EQ(theirs[0].crc32c, crc32c_file(tmp / "rank-1.bin").crc32c);
  entries.insert(entries.end(), theirs.begin(), theirs.end());
  const fs::path step_dir = commit_step_folder(dir.path(), tmp, 3, entries, 0);
  EXPECT_EQ(step_dir, dir / "step-000003");
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_EQ(latest_of(dir.path()), "step-000003");
  const auto manifest = nlohmann::json::parse(read_text_file(step_dir / "manifest.json"));
  EXPECT_EQ(manifest["files"].size(), 3u);
  EXPECT_TRUE(manifest["files"].contains("rank-1.bin"));
  EXPECT_EQ(verify_step_folder(step_dir, kRequired), "");
}

TEST(CheckpointStore, AnAbandonedFolderIsRemovedAndLatestKept) {
  TempDir dir;
  write_step_folder(dir.path(), 1, two_files(1), 0);
  const fs::path tmp = begin_step_folder(dir.path(), 2);
  write_step_files(tmp, two_files(2));
  abandon_step_folder(tmp);
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_EQ(latest_of(dir.path()), "step-000001");
}

TEST(CheckpointStore, AFileTwiceInTheEntriesIsRefusedAndTheFolderRemoved) {
  TempDir dir;
  const fs::path tmp = begin_step_folder(dir.path(), 2);
  std::vector<FileEntry> entries = write_step_files(tmp, two_files(2));
  entries.push_back(entries.front());
  EXPECT_THROW(commit_step_folder(dir.path(), tmp, 2, entries, 0), Error);
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_FALSE(fs::exists(dir / "step-000002"));
}

TEST(CheckpointStore, KeepsTheNewestAndResumesPastADamagedOne) {
  TempDir dir;
  for (int64_t step = 1; step <= 4; ++step) write_step_folder(dir.path(), step, two_files(step), 2);
  EXPECT_FALSE(fs::exists(dir / "step-000001"));
  EXPECT_FALSE(fs::exists(dir / "step-000002"));
  EXPECT_EQ(find_resume_point(dir.path(), kRequired).step, 4);
  // Same length, one byte changed: only the checksum can tell.
  write_file_atomic(dir / "step-000004" / "b.bin", "bytes of step 5");
  const ResumePoint point = find_resume_point(dir.path(), kRequired);
  EXPECT_EQ(point.step, 3);
  EXPECT_EQ(point.dir, dir / "step-000003");
  ASSERT_EQ(point.skipped.size(), 1u);
  EXPECT_NE(point.skipped[0].find("step-000004/b.bin: CRC-32C"), std::string::npos) << point.skipped[0];
}

// One host's folder of a checkpoint whose other files live on other hosts: the manifest
// lists what it holds and the complete set, list_held_steps says which held files verify,
// and add_to_step_folder completes it with files of the set only.
TEST(CheckpointStore, AHostFolderKnowsWhatItLacksAndIsCompletedWithFilesOfTheSet) {
  TempDir dir;
  const fs::path tmp = begin_step_folder(dir.path(), 5);
  const std::vector<FileEntry> here = write_step_files(tmp, two_files(5));
  // rank-1.bin is held elsewhere: its entry as that host computed it.
  const fs::path elsewhere = dir / "other-host";
  fs::create_directory(elsewhere);
  StepFiles other;
  other.names = {"rank-1.bin"};
  other.write = [](const fs::path& folder) { write_file_atomic(folder / "rank-1.bin", "the other host's rank"); };
  const std::vector<FileEntry> theirs = write_step_files(elsewhere, other);
  std::vector<FileEntry> set = here;
  set.insert(set.end(), theirs.begin(), theirs.end());
  const fs::path step_dir = commit_step_folder(dir.path(), tmp, 5, here, 0, set);
  const auto manifest = nlohmann::json::parse(read_text_file(step_dir / "manifest.json"));
  EXPECT_EQ(manifest["files"].size(), 2u);
  EXPECT_EQ(manifest["checkpoint_files"].size(), 3u);

  std::vector<HeldStep> held = list_held_steps(dir.path());
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].step, 5);
  EXPECT_EQ(held[0].held, (std::vector<std::string>{"a.json", "b.bin"}));
  ASSERT_EQ(held[0].checkpoint_files.size(), 3u);
  EXPECT_EQ(held[0].checkpoint_files[2].name, "rank-1.bin");
  EXPECT_EQ(held[0].checkpoint_files[2].crc32c, theirs[0].crc32c);

  // A damaged held file is not held.
  write_file_atomic(step_dir / "b.bin", "bytes of step X");
  held = list_held_steps(dir.path());
  EXPECT_EQ(held[0].held, (std::vector<std::string>{"a.json"}));
  write_file_atomic(step_dir / "b.bin", "bytes of step 5");

  // A file that is not the set's (other bytes) is refused, the manifest untouched.
  write_file_atomic(step_dir / "rank-1.bin", "not the other host's");
  const FileChecksum wrong = crc32c_file(step_dir / "rank-1.bin");
  const std::vector<FileEntry> wrong_entry = {{"rank-1.bin", wrong.bytes, wrong.crc32c}};
  EXPECT_THROW(add_to_step_folder(step_dir, wrong_entry), Error);
  EXPECT_EQ(list_held_steps(dir.path())[0].held.size(), 2u);

  // The set's file: listed, and the folder is whole.
  fs::copy_file(elsewhere / "rank-1.bin", step_dir / "rank-1.bin", fs::copy_options::overwrite_existing);
  add_to_step_folder(step_dir, theirs);
  EXPECT_EQ(list_held_steps(dir.path())[0].held, (std::vector<std::string>{"a.json", "b.bin", "rank-1.bin"}));
  EXPECT_EQ(verify_step_folder(step_dir, kRequired), "");
}

}  // namespace
}  // namespace flotilla::io
