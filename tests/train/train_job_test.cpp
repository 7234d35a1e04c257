// A training job end to end on the sample corpus: the tiny preset with the byte tokenizer
// learns (the validation loss falls below what a model that learned only byte
// frequencies can reach), and the job leaves a loadable model directory and metrics.
#include "flotilla/train/job.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/text/byte_tokenizer.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "../test_seed.hpp"
#include "../temp_dir.hpp"

namespace flotilla::train {
namespace {

using ::flotilla::testing::test_seed;

const std::filesystem::path kCorpus = std::filesystem::path(FLOTILLA_SOURCE_DIR) / "data/sample/corpus.txt";

using ::flotilla::testing::TempDir;

// The tiny preset on the sample corpus from a fresh seed, writing into `out`: `steps`
// steps of batch_size rows of seq_len tokens.
TrainJob tiny_job_on_the_corpus(const TempDir& out, int64_t batch_size, int64_t seq_len, int64_t steps) {
  TrainJob job;
  job.preset = "tiny";
  job.data = kCorpus;
  job.out_dir = out.path();
  job.seed = test_seed();
  job.train.batch_size = batch_size;
  job.train.seq_len = seq_len;
  job.train.steps = steps;
  return job;
}

TEST(TrainJob, LossFallsOnTheSampleCorpus) {
  TempDir out("loss_falls");
  // 100 steps: at 60 the validation loss is 2.63 - 2.83 over seeds, too close to the
  // unigram bound below; at 100 it is 2.42 - 2.56 (8 seeds). Measured 2.5 s wall on 2 idle
  // cores; up to ~30 s when other builds share them.
  TrainJob job = tiny_job_on_the_corpus(out, /*batch_size=*/8, /*seq_len=*/64, /*steps=*/100);
  job.train.lr = 3e-3f;
  job.train.min_lr = 3e-4f;
  job.train.warmup_steps = 5;
  job.train.eval_batches = 8;  // 4096 validation tokens

  const auto t0 = std::chrono::steady_clock::now();
  const TrainSummary summary = run_train_job(job, {});
  const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[   info   ] first loss %.3f, final train loss %.3f, final valid loss %.3f, %.1f s\n",
              summary.first_loss, summary.final_loss, summary.final_valid_loss, wall_s);

  EXPECT_EQ(summary.steps, 100);
  // HF initialisation (N(0, 0.02)) makes every logit ~0 (std ~0.02 sqrt(64) = 0.16): the
  // first loss is that of a near-uniform guess over the 512-token vocabulary, ln 512 = 6.24
  // plus ~sigma^2 / 2 and the noise of one batch; measured 6.22 - 6.31 over seeds.
  EXPECT_NEAR(summary.first_loss, std::log(512.0), 0.25);
  ASSERT_GT(summary.final_valid_loss, 0.0) << "no validation pass";
  EXPECT_LT(summary.final_valid_loss, 0.6 * summary.first_loss);
  // The corpus's byte unigram entropy is 3.10 nats (and its bigram conditional entropy
  // 2.36): a model that learned only byte frequencies cannot go below 3.1 on average, so
  // < 2.8 means it uses context (measured 2.42 - 2.56, see above).
  EXPECT_LT(summary.final_valid_loss, 2.8);
}

TEST(TrainJob, AnAuxiliaryOutputThatCannotBeWrittenNeverCostsTheModel) {
  TempDir out("aux_fails");
  TrainJob job = tiny_job_on_the_corpus(out, /*batch_size=*/2, /*seq_len=*/16, /*steps=*/2);
  job.train.eval_batches = 1;
  // A folder that does not exist: the CLI refuses it before the first step; here the
  // library meets it only after training.
  job.trace_path = out.path() / "no_such_folder" / "trace.json";
  try {
    run_train_job(job, {});
    ADD_FAILURE() << "a trace that cannot be written is not reported";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("the model was written to " + out.path().string() + ", but not: trace"), std::string::npos)
        << msg;
  }
  // Everything else was written, the model first.
  EXPECT_NO_THROW(model::Llama::load(out.path()));
  EXPECT_TRUE(std::filesystem::is_regular_file(out.path() / "metrics.jsonl"));
  EXPECT_TRUE(std::filesystem::is_regular_file(out.path() / "report.json"));
}

TEST(TrainJob, WritesALoadableModelDirectoryAndMetrics) {
  TempDir out("outputs");
  TrainJob job = tiny_job_on_the_corpus(out, /*batch_size=*/2, /*seq_len=*/32, /*steps=*/3);
  job.train.lr = 3e-3f;
  job.train.warmup_steps = 1;
  job.train.eval_batches = 2;
  const TrainSummary summary = run_train_job(job, {});

  // The model directory: the preset's config, the trained weights (checked below by
  // re-evaluating them) and a tokenizer that loads back as the byte tokenizer.
  model::Llama loaded = model::Llama::load(out.path());
  model::ModelConfig expected = model::preset_config("tiny");
  expected.bos_token_id = text::ByteTokenizer::kBos;  // the preset has none: the tokenizer's
  expected.eos_token_id = text::ByteTokenizer::kEos;
  EXPECT_EQ(loaded.config().to_json(), expected.to_json());
  const auto tokenizer = text::Tokenizer::load_for_model(out.path());
  EXPECT_EQ(tokenizer->name(), "bytes");

  // metrics.jsonl: one line per step with its loss, then the validation pass at the end.
  std::ifstream metrics(out.path() / "metrics.jsonl");
  ASSERT_TRUE(metrics) << "no metrics.jsonl";
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(metrics, line);)
    if (!line.empty()) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 4u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(lines[static_cast<size_t>(i)].at("step"), i + 1);
    EXPECT_TRUE(std::isfinite(lines[static_cast<size_t>(i)].at("loss").get<double>()));
  }
  EXPECT_EQ(lines[0].at("loss").get<double>(), summary.first_loss);
  EXPECT_EQ(lines[3].at("step"), 3);
  EXPECT_EQ(lines[3].at("valid_loss").get<double>(), summary.final_valid_loss);

  // The saved weights are the trained ones: evaluating them on the job's validation split
  // (the last 5% of the stream) gives the job's final validation loss. Same weights, same
  // batches, same kernels: equal up to float noise (1e-6 relative); the initial weights
  // would give ~ln 512, far off after three steps at lr 3e-3.
  const text::ByteTokenizer bytes;
  const data::TextDataset dataset = data::load_text_dataset(kCorpus, bytes);
  data::StreamSplit split = data::split_train_valid(dataset.tokens, job.valid_fraction);
  data::SequentialWindowSource valid(std::move(split.valid));
  Trainer evaluator(loaded, job.train);
  const EvalMetrics eval = evaluator.evaluate(valid);
  EXPECT_NEAR(eval.loss, summary.final_valid_loss, 1e-6 * summary.final_valid_loss);
  model::Llama initial(model::preset_config("tiny"));
  initial.init_random(job.seed);
  Trainer initial_evaluator(initial, job.train);
  EXPECT_GT(std::fabs(initial_evaluator.evaluate(valid).loss - eval.loss), 1e-3);
}

}  // namespace
}  // namespace flotilla::train
