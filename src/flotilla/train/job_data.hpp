// A training job's data: where it lies (a prepared dataset folder, an mlx_lm folder of
// JSONL examples prepared for this run, or a raw text / JSONL file), how long rows are
// when the data says so, and the sources the loop reads: training batches, the
// validation loss, the test split's loss.
#pragma once

#include <filesystem>
#include <functional>
#include <memory>

#include "flotilla/data/prepare.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/data/token_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "flotilla/train/job.hpp"
#include "flotilla/train/job_context.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::train {

struct DataFolder {
  // A prepared dataset folder to open, or job.data itself (a prepared folder or a file).
  std::filesystem::path dir;
  // An mlx_lm folder prepared for this run (as `flotilla data prepare` would): its folder
  // is `dir`, removed with it.
  std::unique_ptr<data::TemporaryPreparedData> on_the_fly;
};

// Where the job's data lies, its mlx_lm folder prepared on the way. Without --seq-len
// (job.seq_len_from_data) it sets job.train.seq_len to what the data asks: a prepared
// dataset's rows, or the longest example kept of a folder prepared here. InputError when
// rows are longer than the model's positions.
DataFolder locate_data(TrainJob& job, const model::ModelConfig& cfg, const text::Tokenizer& tokenizer,
                       const InfoSink& info);

struct TrainData {
  // What the sources below read; they point into it.
  std::unique_ptr<data::TokenDataset> prepared;
  std::unique_ptr<data::ExampleSource> train_examples, valid_examples;
  std::unique_ptr<data::TokenDataset::SplitExamples> test_examples;
  std::unique_ptr<data::SequentialWindowSource> valid_stream;
  std::unique_ptr<data::BatchSource> raw_train;  // the windows a RankSlicedSource slices

  std::unique_ptr<data::BatchSource> train;  // this rank's training batches
  std::function<EvalMetrics()> evaluate;     // the validation loss (over every rank); empty: no validation data
  std::function<EvalMetrics()> test;         // --test: the test split's loss, once, in order; empty: no --test
};

// Opens the data in `folder` for this rank: a prepared dataset through the batch sampler
// (truncation at job.train.seq_len told, or InputError when nothing is left to learn), a
// raw text or JSONL file as one token stream split into training and validation windows.
// The evaluations run `model` and sum over the ranks.
TrainData open_train_data(const TrainJob& job, const DataFolder& folder, const text::Tokenizer& tokenizer,
                          model::Llama& model, parallel::PipelineStage* pipeline, const JobRanks& ranks,
                          const InfoSink& info);

}  // namespace flotilla::train
