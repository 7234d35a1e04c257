// Sharded checkpoints on thread ranks: each ZeRO rank writes its own shard (about 3P/N
// floats, the tails rank 0's), the checkpoint reshards onto another world and stage (each
// new rank gets exactly its new shard of the moments and the whole weights), and a rank
// whose write fails leaves no folder behind while every rank stops (none waits for it).
#include "flotilla/train/sharded_checkpoint.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/comm/thread/thread_group.hpp"
#include "flotilla/io/safetensors.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/train/checkpoint.hpp"
#include "small_model.hpp"
#include "../temp_dir.hpp"
#include "../bounded_settings.hpp"

namespace flotilla::train {
namespace {

using test_models::small_config;

namespace fs = std::filesystem;

using ::flotilla::testing::TempDir;

TrainConfig small_train_config(int zero_stage) {
  TrainConfig t;
  t.batch_size = 2;
  t.seq_len = 12;
  t.steps = 10;
  t.lr = 1e-2f;
  t.warmup_steps = 1;
  t.zero_stage = zero_stage;
  t.bucket_mb = 0.004;  // about 1000 floats: several units, each with its tail
  return t;
}

// The whole moments and weights of a world of writers, put together from every rank's
// owned ranges (the ranks hold the same tails).
struct WholeState {
  std::mutex mutex;
  std::vector<float> weights, m, v;

  void add(Trainer& trainer) {
    std::lock_guard<std::mutex> lock(mutex);
    const auto params = trainer.model().trainable().params;
    if (weights.empty()) {
      weights.assign(params.begin(), params.end());
      m.assign(params.size(), 0.0f);
      v.assign(params.size(), 0.0f);
    }
    size_t at = 0;
    for (const FlatRange& r : trainer.optimizer().owned())
      for (int64_t i = r.begin; i < r.end; ++i, ++at) {
        m[static_cast<size_t>(i)] = trainer.optimizer().m()[at];
        v[static_cast<size_t>(i)] = trainer.optimizer().v()[at];
      }
  }
};

// Trains two steps on `world` thread ranks at `stage` and saves; returns the step folder.
fs::path write_on_threads(const fs::path& checkpoints, int world, int stage, WholeState& whole) {
  fs::path step_dir;
  comm::run_threads(world, [&](comm::Communicator& comm) {
    parallel::DataParallel dp(comm);
    model::Llama model(small_config());
    model.init_random(7);
    data::RandomWindowSource source(test_models::random_tokens(3, 2000, 48), 5 + static_cast<uint64_t>(comm.rank()));
    Trainer trainer(model, small_train_config(stage), &dp);
    trainer.step(source);
    trainer.step(source);
    const fs::path dir = save_sharded_checkpoint(checkpoints, trainer, source, {{"world", world}}, 0, &dp);
    whole.add(trainer);
    if (comm.rank() == 0) step_dir = dir;
  }, testing::bounded_settings(60));
  return step_dir;
}

TEST(ShardedCheckpointRanks, EachZeroRankWritesItsShardAndTheTailsAreRank0s) {
  TempDir dir("shards");
  WholeState whole;
  const fs::path step_dir = write_on_threads(dir.path(), 3, 2, whole);
  EXPECT_EQ(verify_checkpoint(step_dir), "");
  const auto arena = static_cast<int64_t>(whole.weights.size());
  int64_t total = 0;
  for (int r = 0; r < 3; ++r) {
    const io::SafetensorsFile st(step_dir / rank_file_name(r));
    const int64_t floats = st.at("weights").shape[0];
    total += floats;
    // P/N each; rank 0 also the units' tails (fewer than N floats per unit).
    EXPECT_NEAR(static_cast<double>(floats), static_cast<double>(arena) / 3, 0.02 * static_cast<double>(arena))
        << "rank " << r;
  }
  EXPECT_EQ(total, arena) << "every float of the arena written once";
}

TEST(ShardedCheckpointRanks, ThreeZero2RanksReshardOntoTwoZero1RanksAndOnePlainRank) {
  TempDir dir("reshard");
  WholeState whole;
  const fs::path step_dir = write_on_threads(dir.path(), 3, 2, whole);
  const auto check = [&](Trainer& trainer, const std::string& who) {
    const auto params = trainer.model().trainable().params;
    ASSERT_EQ(params.size(), whole.weights.size());
    EXPECT_TRUE(std::equal(params.begin(), params.end(), whole.weights.begin())) << who << ": weights";
    size_t at = 0;
    bool m_same = true, v_same = true;
    for (const FlatRange& r : trainer.optimizer().owned())
      for (int64_t i = r.begin; i < r.end; ++i, ++at) {
        m_same &= trainer.optimizer().m()[at] == whole.m[static_cast<size_t>(i)];
        v_same &= trainer.optimizer().v()[at] == whole.v[static_cast<size_t>(i)];
      }
    EXPECT_TRUE(m_same) << who << ": m";
    EXPECT_TRUE(v_same) << who << ": v";
    EXPECT_EQ(trainer.steps_done(), 2) << who;
  };
  comm::run_threads(2, [&](comm::Communicator& comm) {
    parallel::DataParallel dp(comm);
    model::Llama model(small_config());
    model.init_random(99);  // overwritten
    data::RandomWindowSource source(test_models::random_tokens(3, 2000, 48), 5);
    Trainer trainer(model, small_train_config(1), &dp);
    restore_training_state(step_dir, trainer, source);
    ASSERT_TRUE(trainer.sync().sharded());
    check(trainer, "ZeRO-1 rank " + std::to_string(comm.rank()));
  }, testing::bounded_settings(60));
  model::Llama model(small_config());
  data::RandomWindowSource source(test_models::random_tokens(3, 2000, 48), 5);
  Trainer trainer(model, small_train_config(0));
  restore_training_state(step_dir, trainer, source);
  check(trainer, "one plain rank");
}

TEST(ShardedCheckpointRanks, ARankThatFailsLeavesNoFolderAndEveryRankStops) {
  TempDir dir("failure");
  WholeState whole;
  write_on_threads(dir.path(), 3, 1, whole);  // step 2, kept
  std::vector<std::string> errors(3);
  comm::run_threads(3, [&](comm::Communicator& comm) {
    parallel::DataParallel dp(comm);
    model::Llama model(small_config());
    model.init_random(7);
    data::RandomWindowSource source(test_models::random_tokens(3, 2000, 48), 5);
    Trainer trainer(model, small_train_config(1), &dp);
    for (int i = 0; i < 3; ++i) trainer.step(source);
    io::StepFiles failing;
    if (comm.rank() == 2) {
      failing.names = {"rank-00002.extra"};
      failing.write = [](const fs::path&) { throw std::runtime_error("disk full"); };
    }
    try {
      save_sharded_checkpoint(dir.path(), trainer, source, {}, 0, &dp, {}, failing);
    } catch (const RunStopped& e) {
      errors[static_cast<size_t>(comm.rank())] = e.what();
      EXPECT_EQ(e.quiet(), comm.rank() != 0) << "rank 0 says it";
    }
  }, testing::bounded_settings(60));
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[static_cast<size_t>(r)].find("rank 2: disk full"), std::string::npos)
        << "rank " << r << ": " << errors[static_cast<size_t>(r)];
    EXPECT_NE(errors[static_cast<size_t>(r)].find("step 3"), std::string::npos) << errors[static_cast<size_t>(r)];
  }
  EXPECT_FALSE(fs::exists(dir.path() / "step-000003"));
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_TRUE(e.path().filename() == "latest" || e.path().filename() == "step-000002") << e.path();
  EXPECT_EQ(read_text_file(dir.path() / "latest"), "step-000002\n");
  EXPECT_EQ(verify_checkpoint(dir.path() / "step-000002"), "");
}

}  // namespace
}  // namespace flotilla::train
