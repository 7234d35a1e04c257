// Checkpoints as a specification: stopping at step k, saving, and resuming in a new
// trainer, model and data source gives the parameters of a run that never stopped, bit for
// bit (raw-text windows and the prepared-data batch sampler); a damaged newest checkpoint
// is reported in one line and the previous good one is used; crash leftovers are ignored.
#include "flotilla/train/checkpoint.hpp"
#include "flotilla/train/training_state.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/data/batch_sampler.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/base/crc32c.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/io/shard_layout.hpp"
#include "flotilla/train/job.hpp"
#include "flotilla/train/sharded_checkpoint.hpp"
#include "flotilla/train/trainer.hpp"
#include "../test_seed.hpp"
#include "small_model.hpp"
#include "../temp_dir.hpp"

namespace flotilla::train {
namespace {

using test_models::small_config;

namespace fs = std::filesystem;

using ::flotilla::testing::test_seed;

using ::flotilla::testing::TempDir;

TrainConfig small_train_config(int64_t steps) {
  TrainConfig t;
  t.batch_size = 2;
  t.seq_len = 12;
  t.grad_accum = 2;
  t.steps = steps;
  t.lr = 1e-2f;
  t.min_lr = 1e-3f;
  t.warmup_steps = 2;  // so the resumed half sees both warm-up and cosine positions
  return t;
}

std::vector<int32_t> random_stream(uint64_t seed, size_t n, int32_t vocab) {
  Rng rng(seed);
  std::vector<int32_t> s(n);
  for (int32_t& t : s) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  return s;
}

// Prepared examples held in vectors: random tokens below the vocabulary, random lengths
// (some longer than a row, so truncation is exercised), 3/4 of positions in the loss.
class RandomExamples final : public data::ExampleSource {
 public:
  RandomExamples(uint64_t seed, size_t n, uint32_t vocab) {
    Rng rng(seed);
    for (size_t i = 0; i < n; ++i) {
      const size_t len = 2 + rng.below(18);
      std::vector<uint32_t> toks(len);
      std::vector<uint8_t> bits((len + 7) / 8, 0);
      for (size_t p = 0; p < len; ++p) {
        toks[p] = static_cast<uint32_t>(rng.below(vocab));
        if (rng.below(4) != 0) bits[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
      }
      tokens_.push_back(std::move(toks));
      bits_.push_back(std::move(bits));
    }
  }
  size_t num_examples() const override { return tokens_.size(); }
  data::ExampleView example(size_t i) const override {
    return data::ExampleView{tokens_[i], data::LossMaskView(bits_[i].data(), 0, tokens_[i].size())};
  }

 private:
  std::vector<std::vector<uint32_t>> tokens_;
  std::vector<std::vector<uint8_t>> bits_;
};

void expect_same_floats(std::span<const float> a, std::span<const float> b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size_bytes()), 0) << what << " differ";
}

void expect_same_training_state(Trainer& a, Trainer& b) {
  expect_same_floats(a.model().params(), b.model().params(), "parameters");
  expect_same_floats(a.optimizer().m(), b.optimizer().m(), "AdamW first moments");
  expect_same_floats(a.optimizer().v(), b.optimizer().v(), "AdamW second moments");
  EXPECT_EQ(a.optimizer().steps_taken(), b.optimizer().steps_taken());
  EXPECT_EQ(a.steps_done(), b.steps_done());
  EXPECT_EQ(a.model().dropout_step(), b.model().dropout_step()) << "LoRA dropout's counter";
}

// Trains 2k steps straight (A); trains again saving at step k and going on to 2k (B: a save
// must not disturb the run); then builds a new model (other init), a new source (from
// make_source with another seed) and a new trainer, resumes from B's checkpoint and trains
// to 2k (C). A, B and C must agree bit for bit.
enum class Format { unsharded, sharded };

template <class MakeSource>
void check_exact_resume(uint64_t seed, int64_t k, MakeSource make_source, Format format = Format::unsharded) {
  TempDir dir("exact_resume");
  const fs::path checkpoints = dir.path() / "checkpoints";
  const TrainConfig cfg = small_train_config(2 * k);

  model::Llama model_a(small_config());
  model_a.init_random(seed);
  auto source_a = make_source(seed);
  Trainer a(model_a, cfg);
  a.run(*source_a, std::function<EvalMetrics()>{}, {}, {});

  model::Llama model_b(small_config());
  model_b.init_random(seed);
  auto source_b = make_source(seed);
  Trainer b(model_b, cfg);
  b.run(*source_b, std::function<EvalMetrics()>{}, {}, {}, [&](int64_t step) {
    if (step != k) return;
    // Unsharded: the format written before sharded checkpoints, which must still resume.
    if (format == Format::unsharded) save_training_checkpoint(checkpoints, b, *source_b, {{"note", "test"}}, 3);
    else save_sharded_checkpoint(checkpoints, b, *source_b, {{"note", "test"}}, 3, nullptr);
  });
  expect_same_training_state(a, b);

  model::Llama model_c(small_config());
  model_c.init_random(seed + 1);  // overwritten by the checkpoint
  auto source_c = make_source(seed + 1);  // its state too
  Trainer c(model_c, cfg);
  const io::ResumePoint point = find_resume_point(dir.path());
  EXPECT_TRUE(point.skipped.empty());
  ASSERT_EQ(point.step, k);
  const nlohmann::json saved_config = restore_training_state(point.dir, c, *source_c);
  EXPECT_EQ(saved_config, (nlohmann::json{{"note", "test"}}));
  EXPECT_EQ(c.steps_done(), k);
  std::vector<float> resumed_lrs;
  c.run(*source_c, std::function<EvalMetrics()>{}, [&](const StepMetrics& m) { resumed_lrs.push_back(m.lr); }, {});
  expect_same_training_state(a, c);
  // The schedule continued from step k, not from 0.
  ASSERT_EQ(resumed_lrs.size(), static_cast<size_t>(k));
  EXPECT_EQ(resumed_lrs.front(), c.schedule().lr_at(k));
}

// ---- Exact resume ---------------------------------------------------------------------

TEST(CheckpointResume, RandomWindowsResumeBitForBit) {
  const uint64_t seed = test_seed();
  const std::vector<int32_t> stream = random_stream(seed, 3000, small_config().vocab_size);
  check_exact_resume(seed, 3, [&](uint64_t source_seed) {
    return std::make_unique<data::RandomWindowSource>(stream, source_seed);
  });
}

TEST(CheckpointResume, ShardedCheckpointOfOneRankResumesBitForBit) {
  const uint64_t seed = test_seed();
  const std::vector<int32_t> stream = random_stream(seed, 3000, small_config().vocab_size);
  check_exact_resume(
      seed, 3, [&](uint64_t source_seed) { return std::make_unique<data::RandomWindowSource>(stream, source_seed); },
      Format::sharded);
}

TEST(CheckpointResume, BatchSamplerResumesBitForBit) {
  const uint64_t seed = test_seed();
  // 7 examples and 2 x 2 rows per step: the resumed half crosses epoch boundaries.
  const RandomExamples examples(seed, 7, static_cast<uint32_t>(small_config().vocab_size));
  check_exact_resume(seed, 3, [&](uint64_t source_seed) {
    data::SamplerConfig sc;
    sc.seq_len = 12;
    sc.micro_batch = 2;
    sc.grad_accum = 2;
    sc.pack = true;
    sc.seed = seed;  // the order is the run's; a resumed source must not need its own
    (void)source_seed;
    return std::make_unique<data::BatchSampler>(examples, sc);
  });
}

// ---- Finding the checkpoint to resume from ---------------------------------------------

// A run that saved after each of steps 1..n.
struct SavedRun {
  explicit SavedRun(const std::string& tag, int n, int keep = 0) : dir(tag), checkpoints(dir.path() / "checkpoints") {
    model.init_random(7);
    for (int i = 0; i < n; ++i) {
      trainer.step(source);
      save_training_checkpoint(checkpoints, trainer, source, {}, keep);
    }
  }
  fs::path step_dir(int64_t step) const { return checkpoints / io::checkpoint_dir_name(step); }

  TempDir dir;
  fs::path checkpoints;
  model::Llama model{small_config()};
  data::RandomWindowSource source{random_stream(3, 500, 48), 5};
  Trainer trainer{model, small_train_config(10)};
};

void flip_byte(const fs::path& file, uint64_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << file;
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x10);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

std::string trim_copy(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(CheckpointFolders, LayoutManifestAndLatest) {
  SavedRun run("layout", 2);
  EXPECT_EQ(trim_copy(read_text_file(run.checkpoints / "latest")), "step-000002");
  for (const char* f : {"weights.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json",
                        "manifest.json"})
    EXPECT_TRUE(fs::is_regular_file(run.step_dir(2) / f)) << f;
  const auto manifest = nlohmann::json::parse(read_text_file(run.step_dir(2) / "manifest.json"));
  EXPECT_EQ(manifest["step"], 2);
  EXPECT_EQ(manifest["files"]["weights.safetensors"]["bytes"],
            fs::file_size(run.step_dir(2) / "weights.safetensors"));
  const auto state = nlohmann::json::parse(read_text_file(run.step_dir(2) / "trainer_state.json"));
  EXPECT_EQ(state["step"], 2);
  EXPECT_EQ(state["optimizer"]["step"], 2);
  EXPECT_EQ(state["schedule"]["position"], 2);
  EXPECT_EQ(state["data"]["kind"], "random_window");
  EXPECT_EQ(state["rng"]["dropout_step"], run.model.dropout_step());  // training forwards so far
  EXPECT_TRUE(state["rng"]["streams"].is_object());
  EXPECT_EQ(verify_checkpoint(run.step_dir(2)), "");
  // No temporary folder is left behind.
  for (const auto& e : fs::directory_iterator(run.checkpoints))
    EXPECT_TRUE(e.path().filename() == "latest" || io::parse_checkpoint_dir_name(e.path().filename().string()))
        << e.path();
}

TEST(CheckpointFolders, KeepsTheNewestK) {
  SavedRun run("keep", 5, /*keep=*/3);
  EXPECT_FALSE(fs::exists(run.step_dir(1)));
  EXPECT_FALSE(fs::exists(run.step_dir(2)));
  for (int s = 3; s <= 5; ++s) EXPECT_TRUE(fs::is_directory(run.step_dir(s))) << s;
  EXPECT_EQ(find_resume_point(run.dir.path()).step, 5);
}

TEST(CheckpointFolders, CorruptWeightsFallBackToThePreviousCheckpoint) {
  SavedRun run("corrupt", 3);
  const fs::path weights = run.step_dir(3) / "weights.safetensors";
  flip_byte(weights, fs::file_size(weights) - 5);  // a byte of tensor data, not the header
  const io::ResumePoint point = find_resume_point(run.dir.path());
  EXPECT_EQ(point.step, 2);
  EXPECT_EQ(point.dir, run.step_dir(2));
  ASSERT_EQ(point.skipped.size(), 1u);
  const std::string& why = point.skipped[0];
  std::printf("[   info   ] %s\n", why.c_str());
  EXPECT_TRUE(contains(why, "step-000003/weights.safetensors")) << why;
  EXPECT_TRUE(contains(why, "CRC-32C")) << why;
  EXPECT_EQ(why.find('\n'), std::string::npos) << "one line";

  // And the fallback restores step 2's state.
  model::Llama model(small_config());
  data::RandomWindowSource source(random_stream(3, 500, 48), 99);
  Trainer trainer(model, small_train_config(10));
  restore_training_state(point.dir, trainer, source);
  EXPECT_EQ(trainer.steps_done(), 2);
}

TEST(CheckpointFolders, TruncatedFileFallsBack) {
  SavedRun run("truncated", 3);
  const fs::path optimizer = run.step_dir(3) / "optimizer.safetensors";
  fs::resize_file(optimizer, fs::file_size(optimizer) / 2);
  const io::ResumePoint point = find_resume_point(run.dir.path());
  EXPECT_EQ(point.step, 2);
  ASSERT_EQ(point.skipped.size(), 1u);
  EXPECT_TRUE(contains(point.skipped[0], "optimizer.safetensors")) << point.skipped[0];
  EXPECT_TRUE(contains(point.skipped[0], "truncated")) << point.skipped[0];
}

TEST(CheckpointFolders, MissingManifestFallsBack) {
  SavedRun run("no_manifest", 2);
  fs::remove(run.step_dir(2) / "manifest.json");
  const io::ResumePoint point = find_resume_point(run.dir.path());
  EXPECT_EQ(point.step, 1);
  ASSERT_EQ(point.skipped.size(), 1u);
  EXPECT_TRUE(contains(point.skipped[0], "manifest.json: missing")) << point.skipped[0];
}

TEST(CheckpointFolders, LeftoverTmpFolderIsIgnoredAndRemoved) {
  SavedRun run("tmp_leftover", 2);
  // A write killed half-way: a newer step's folder under its temporary name, with files.
  const fs::path tmp = run.checkpoints / "step-000003.tmp-99999";
  fs::copy(run.step_dir(2), tmp);
  flip_byte(tmp / "weights.safetensors", 100);
  const io::ResumePoint point = find_resume_point(run.dir.path());
  EXPECT_EQ(point.step, 2);
  EXPECT_TRUE(point.skipped.empty());
  EXPECT_FALSE(fs::exists(tmp));
}

TEST(CheckpointFolders, LatestNamingAMissingFolderFallsBack) {
  SavedRun run("dangling_latest", 2);
  write_file_atomic(run.checkpoints / "latest", std::string_view("step-000009\n"));
  const io::ResumePoint point = find_resume_point(run.dir.path());
  EXPECT_EQ(point.step, 2);
  ASSERT_EQ(point.skipped.size(), 1u);
  EXPECT_TRUE(contains(point.skipped[0], "latest: names step-000009, which does not exist")) << point.skipped[0];
}

TEST(CheckpointFolders, ResumeAcceptsTheCheckpointsFolderOrOneStepFolder) {
  SavedRun run("paths", 2);
  EXPECT_EQ(find_resume_point(run.checkpoints).step, 2);
  EXPECT_EQ(find_resume_point(run.step_dir(1)).step, 1);
  // A step folder named directly must be good: no silent fallback.
  flip_byte(run.step_dir(1) / "config.json", 0);
  try {
    find_resume_point(run.step_dir(1));
    FAIL() << "no error for a corrupt step folder";
  } catch (const InputError& e) {
    EXPECT_TRUE(contains(e.what(), "config.json")) << e.what();
  }
}

TEST(CheckpointFolders, NothingUsableIsAnInputError) {
  SavedRun run("all_bad", 1);
  flip_byte(run.step_dir(1) / "trainer_state.json", 3);
  try {
    find_resume_point(run.dir.path());
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_TRUE(contains(e.what(), "no usable checkpoint")) << e.what();
    EXPECT_TRUE(contains(e.what(), "trainer_state.json")) << e.what();
  }
  TempDir empty("empty");
  EXPECT_THROW(find_resume_point(empty.path()), InputError);
}

TEST(CheckpointFolders, SavingAStepAgainReplacesItsFolder) {
  SavedRun run("resave", 2);
  flip_byte(run.step_dir(2) / "weights.safetensors", fs::file_size(run.step_dir(2) / "weights.safetensors") - 1);
  save_training_checkpoint(run.checkpoints, run.trainer, run.source, {}, 0);
  EXPECT_EQ(verify_checkpoint(run.step_dir(2)), "");
  EXPECT_TRUE(find_resume_point(run.dir.path()).skipped.empty());
}

TEST(CheckpointRestore, TensorMismatchNamesTheCheckpointFile) {
  SavedRun run("mismatch", 1);
  model::ModelConfig other = small_config();
  other.ffn_dim = 96;
  model::Llama model(other);
  data::RandomWindowSource source(random_stream(3, 500, 48), 5);
  Trainer trainer(model, small_train_config(10));
  try {
    restore_training_state(run.step_dir(1), trainer, source);
    FAIL() << "no error for a checkpoint of another model";
  } catch (const InputError& e) {
    EXPECT_TRUE(contains(e.what(), (run.step_dir(1) / "weights.safetensors").string())) << e.what();
    EXPECT_TRUE(contains(e.what(), "mlp")) << e.what();
    EXPECT_TRUE(contains(e.what(), "shape")) << e.what();
  }
  EXPECT_EQ(trainer.steps_done(), 0);
}

TEST(CheckpointRestore, DataSourceMismatchNamesTheStateFile) {
  SavedRun run("data_mismatch", 1);
  model::Llama model(small_config());
  data::RandomWindowSource source(random_stream(3, 400, 48), 5);  // another stream length
  Trainer trainer(model, small_train_config(10));
  try {
    restore_training_state(run.step_dir(1), trainer, source);
    FAIL() << "no error for another data stream";
  } catch (const InputError& e) {
    EXPECT_TRUE(contains(e.what(), "trainer_state.json")) << e.what();
  }
}

TEST(CheckpointRestore, RandomStreamsRoundTrip) {
  TempDir dir("rng");
  model::Llama model(small_config());
  model.init_random(1);
  data::RandomWindowSource source(random_stream(3, 500, 48), 5);
  Trainer trainer(model, small_train_config(10));
  Rng dropout(test_seed());
  dropout.next_u64();
  const fs::path step_dir = save_training_checkpoint(dir.path(), trainer, source, {}, 3, {{"lora_dropout", &dropout}});
  const uint64_t expected = dropout.next_u64();

  Rng restored(0);
  restore_training_state(step_dir, trainer, source, {{"lora_dropout", &restored}});
  EXPECT_EQ(restored.next_u64(), expected);
  // A run without that stream refuses the checkpoint rather than silently dropping it.
  EXPECT_THROW(restore_training_state(step_dir, trainer, source), InputError);
}

// ---- Sharded checkpoints ----------------------------------------------------------------

// One process's sharded checkpoint after a step: one rank file holding the whole arena.
struct ShardedRun {
  explicit ShardedRun(const std::string& tag) : dir(tag) {
    model.init_random(7);
    trainer.step(source);
    step_dir = save_sharded_checkpoint(dir.path() / "checkpoints", trainer, source, {}, 0, nullptr);
  }
  // Rewrites `file` of the step folder and its manifest entry, as a damaged writer would
  // have (the checksums match: only the layout check can tell).
  void rewrite(const std::string& file, const std::string& text) {
    write_file_atomic(step_dir / file, text);
    auto manifest = nlohmann::json::parse(read_text_file(step_dir / "manifest.json"));
    const FileChecksum sum = crc32c_file(step_dir / file);
    manifest["files"][file] = {{"bytes", sum.bytes}, {"crc32c", crc32c_hex(sum.crc32c)}};
    write_file_atomic(step_dir / "manifest.json", manifest.dump(2));
  }
  nlohmann::json layout() const { return nlohmann::json::parse(read_text_file(step_dir / "layout.json")); }

  TempDir dir;
  model::Llama model{small_config()};
  data::RandomWindowSource source{random_stream(3, 500, 48), 5};
  Trainer trainer{model, small_train_config(10)};
  fs::path step_dir;
};

TEST(ShardedCheckpoint, OneRankWritesTheWholeArenaOnce) {
  ShardedRun run("sharded_layout");
  for (const char* f : {"rank-00000.safetensors", "layout.json", "trainer_state.json", "config.json", "manifest.json"})
    EXPECT_TRUE(fs::is_regular_file(run.step_dir / f)) << f;
  EXPECT_FALSE(fs::exists(run.step_dir / "weights.safetensors"));
  const auto arena = static_cast<int64_t>(run.model.trainable().params.size());
  const nlohmann::json layout = run.layout();
  EXPECT_EQ(layout["arena_floats"], arena);
  EXPECT_EQ(layout["files"]["rank-00000.safetensors"]["m"], (nlohmann::json{{0, arena}}));
  const io::SafetensorsFile st(run.step_dir / "rank-00000.safetensors");
  EXPECT_EQ(st.at("weights").shape, std::vector<int64_t>{arena});
  EXPECT_EQ(std::memcmp(st.at("v").bytes.data(), run.trainer.optimizer().v().data(), st.at("v").bytes.size()), 0);
  EXPECT_EQ(verify_checkpoint(run.step_dir), "");
}

TEST(ShardedCheckpoint, EqualCutTilesTheArena) {
  EXPECT_EQ(equal_cut(10, 0, 3), (std::vector<io::FloatRange>{{0, 3}}));
  EXPECT_EQ(equal_cut(10, 1, 3), (std::vector<io::FloatRange>{{3, 6}}));
  EXPECT_EQ(equal_cut(10, 2, 3), (std::vector<io::FloatRange>{{6, 10}}));
  EXPECT_TRUE(equal_cut(2, 0, 3).empty());  // fewer floats than ranks: some own nothing
  EXPECT_EQ(equal_cut(2, 1, 3), (std::vector<io::FloatRange>{{0, 1}}));
}

TEST(ShardedCheckpoint, AMissingRankFileIsNamed) {
  ShardedRun run("sharded_missing");
  fs::remove(run.step_dir / "rank-00000.safetensors");
  EXPECT_EQ(verify_checkpoint(run.step_dir), "rank-00000.safetensors: missing");
}

TEST(ShardedCheckpoint, ARangeMissingOrWrittenTwiceIsNamed) {
  ShardedRun run("sharded_ranges");
  const auto arena = static_cast<int64_t>(run.model.trainable().params.size());
  nlohmann::json layout = run.layout();
  layout["files"]["rank-00000.safetensors"]["m"] = {{0, arena - 16}};
  run.rewrite("layout.json", layout.dump());
  EXPECT_EQ(verify_checkpoint(run.step_dir),
            fmt::format("layout.json: range [{}, {}) of m is in no rank file (damaged checkpoint)", arena - 16, arena));
  // A second file that claims part of the first one's range.
  layout = run.layout();
  layout["files"]["rank-00000.safetensors"]["m"] = {{0, arena}};
  layout["files"]["rank-00001.safetensors"] = {{"weights", nlohmann::json::array()},
                                               {"m", {{16, 32}}},
                                               {"v", nlohmann::json::array()}};
  run.rewrite("layout.json", layout.dump());
  EXPECT_EQ(verify_checkpoint(run.step_dir),
            "layout.json: names rank-00001.safetensors, which the manifest does not list (missing rank file)");
  run.rewrite("rank-00001.safetensors", read_text_file(run.step_dir / "rank-00000.safetensors"));
  EXPECT_EQ(verify_checkpoint(run.step_dir),
            "layout.json: range [16, 32) of m is written twice, by rank-00000.safetensors and rank-00001.safetensors "
            "(damaged checkpoint)");
  // find_resume_point refuses it with that line.
  try {
    find_resume_point(run.step_dir);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_TRUE(contains(e.what(), "written twice")) << e.what();
  }
}

TEST(ShardedCheckpoint, AnotherModelIsRefusedNamingTheTensorBeforeAnythingIsCopied) {
  ShardedRun run("sharded_mismatch");
  model::ModelConfig other = small_config();
  other.ffn_dim = 96;
  model::Llama model(other);
  model.init_random(3);
  const std::vector<float> before(model.params().begin(), model.params().end());
  data::RandomWindowSource source(random_stream(3, 500, 48), 5);
  Trainer trainer(model, small_train_config(10));
  try {
    restore_training_state(run.step_dir, trainer, source);
    FAIL() << "no error for a checkpoint of another model";
  } catch (const InputError& e) {
    EXPECT_TRUE(contains(e.what(), (run.step_dir / "layout.json").string())) << e.what();
    EXPECT_TRUE(contains(e.what(), "mlp")) << e.what();
    EXPECT_TRUE(contains(e.what(), "shape")) << e.what();
  }
  EXPECT_TRUE(std::equal(before.begin(), before.end(), model.params().begin()));
  EXPECT_EQ(trainer.steps_done(), 0);
}

TEST(ShardedCheckpoint, ConsolidatedWeightsAreTheModels) {
  ShardedRun run("sharded_consolidate");
  const ConsolidatedWeights w = read_checkpoint_weights(run.step_dir);
  const std::span<const float> params = run.model.trainable().params;
  ASSERT_EQ(w.arena.size(), params.size());
  EXPECT_EQ(std::memcmp(w.arena.data(), params.data(), params.size_bytes()), 0);
  EXPECT_EQ(w.layout.table.size(), run.model.trainable().table.params().size());
  // The unsharded format gives the same.
  const fs::path old_dir = save_training_checkpoint(run.dir.path() / "old", run.trainer, run.source, {}, 0);
  const ConsolidatedWeights old = read_checkpoint_weights(old_dir);
  for (const model::ParamInfo& info : run.model.trainable().table.params()) {
    const std::span<const float> a = w.tensor(info.name, info.shape, run.step_dir);
    const std::span<const float> b = old.tensor(info.name, info.shape, old_dir);
    ASSERT_EQ(a.size(), b.size()) << info.name;
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin())) << info.name;
  }
  EXPECT_THROW(w.tensor("no.such.weight", std::vector<int64_t>{1}, run.step_dir), InputError);
}

TEST(CheckpointConfig, DifferencesAreListedByKey) {
  const nlohmann::json a = {{"seed", 1}, {"train", {{"steps", 100}, {"lr", 0.001}}}};
  const nlohmann::json b = {{"seed", 1}, {"train", {{"steps", 200}, {"lr", 0.001}}}, {"pack", true}};
  const auto d = config_differences(a, b);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0], "pack: (none) -> true");
  EXPECT_EQ(d[1], "train.steps: 100 -> 200");
}

// ---- The training job ------------------------------------------------------------------

TEST(CheckpointJob, ResumedJobWritesTheSameModelAsAStraightRun) {
  const uint64_t seed = test_seed();
  TempDir straight("job_straight"), resumed("job_resumed");
  TrainJob job;
  job.preset = "tiny";
  job.data = fs::path(FLOTILLA_SOURCE_DIR) / "data/sample/corpus.txt";
  job.seed = seed;
  job.train.batch_size = 2;
  job.train.seq_len = 16;
  job.train.steps = 4;
  job.train.warmup_steps = 1;
  job.train.eval_batches = 1;
  job.train.eval_every = 1;  // validation between steps must not disturb the run either
  job.out_dir = straight.path();
  const TrainSummary a = run_train_job(job, {});
  EXPECT_FALSE(fs::exists(straight.path() / "checkpoints")) << "no checkpoints unless --save-every";

  // The same run with checkpoints at 2 and 4; then resume it from step 2.
  job.out_dir = resumed.path();
  job.save_every = 2;
  run_train_job(job, {});
  const fs::path checkpoints = resumed.path() / "checkpoints";
  ASSERT_TRUE(fs::is_directory(checkpoints / "step-000004"));
  // A fresh run into the same folder neither mixes its checkpoints with these nor deletes them.
  EXPECT_THROW(run_train_job(job, {}), InputError);
  EXPECT_TRUE(fs::is_directory(checkpoints / "step-000004"));
  fs::remove_all(checkpoints / "step-000004");  // as if killed after step 3
  std::vector<std::string> infos;
  job.resume_from = resumed.path();
  TrainCallbacks cb;
  cb.on_info = [&](const std::string& s) { infos.push_back(s); };
  const TrainSummary b = run_train_job(job, cb);
  EXPECT_EQ(b.resumed_from_step, 2);
  EXPECT_EQ(b.steps, 4);
  bool reported_dangling = false;
  for (const std::string& s : infos) reported_dangling |= contains(s, "latest: names step-000004");
  EXPECT_TRUE(reported_dangling);

  const model::Llama ma = model::Llama::load(straight.path());
  const model::Llama mb = model::Llama::load(resumed.path());
  expect_same_floats(ma.params(), mb.params(), "final model parameters");
  EXPECT_EQ(a.final_loss, b.final_loss);
  EXPECT_EQ(a.first_loss, b.first_loss) << "the resumed run's summary starts from the saved metrics";
  // metrics.jsonl holds every step once: steps 1-2 from before the resume, 3-4 after.
  std::ifstream metrics(resumed.path() / "metrics.jsonl");
  std::vector<int64_t> steps;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) steps.push_back(j["step"].get<int64_t>());
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4}));
}

TEST(CheckpointJob, ResumedLoraRunWithDropoutWritesTheSameAdapters) {
  // LoRA: only the adapters and their optimizer state are saved; dropout masks come from
  // the step counter saved as RNG state, so a resumed run draws the same masks.
  const uint64_t seed = test_seed();
  TempDir straight("lora_straight"), resumed("lora_resumed");
  TrainJob job;
  job.preset = "tiny";
  job.data = fs::path(FLOTILLA_SOURCE_DIR) / "data/sample/corpus.txt";
  job.seed = seed;
  job.fine_tune = FineTuneType::lora;
  job.lora.rank = 4;
  job.lora.dropout = 0.1f;
  job.lora.targets = model::LoraConfig::parse_targets("q,v,down");
  job.train.batch_size = 2;
  job.train.seq_len = 16;
  job.train.steps = 4;
  job.train.warmup_steps = 1;
  job.train.eval_batches = 1;
  job.out_dir = straight.path();
  const TrainSummary a = run_train_job(job, {});
  job.out_dir = resumed.path();
  job.save_every = 2;
  run_train_job(job, {});
  fs::remove_all(resumed.path() / "checkpoints" / "step-000004");  // as if killed after step 3
  job.resume_from = resumed.path();
  const TrainSummary b = run_train_job(job, {});
  EXPECT_EQ(b.resumed_from_step, 2);
  EXPECT_EQ(a.final_loss, b.final_loss);
  const auto read = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const std::string adapters_a = read(straight.path() / "adapter_model.safetensors");
  ASSERT_FALSE(adapters_a.empty());
  EXPECT_TRUE(adapters_a == read(resumed.path() / "adapter_model.safetensors")) << "adapters differ byte for byte";
}

}  // namespace
}  // namespace flotilla::train
