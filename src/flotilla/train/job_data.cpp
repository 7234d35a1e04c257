#include "flotilla/train/job_data.hpp"

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/data/batch_sampler.hpp"
#include "flotilla/data/chat_template.hpp"
#include "flotilla/data/rank_slice.hpp"

namespace flotilla::train {
namespace {

// Says what rows of T positions cut from a split's examples: how many examples, how many
// target tokens. For training, InputError when no example keeps a target (nothing to
// learn), and a warning when some keep none (batches of only those are skipped).
void check_truncation(const data::TruncationStats& s, std::string_view split, int64_t T, bool training,
                      const std::filesystem::path& data, const InfoSink& info) {
  if (training && s.without_targets == s.examples)
    throw InputError("train", fmt::format("{}: no training example has a target token within rows of --seq-len {}: "
                                          "nothing to learn; raise --seq-len (the longest example has {} tokens)",
                                          data.string(), T, s.longest));
  if (s.truncated == 0) return;
  info(fmt::format("warning: {} of {} {} examples do not fit in rows of --seq-len {}: {} of {} target tokens ({:.1f}%) "
                   "past the row are {}; --seq-len {} keeps them all",
                   s.truncated, s.examples, split, T, s.targets_lost, s.targets,
                   s.targets > 0 ? 100.0 * static_cast<double>(s.targets_lost) / static_cast<double>(s.targets) : 0.0,
                   training ? "never trained on" : "not evaluated", s.longest));
  if (training && s.without_targets > 0)
    info(fmt::format("warning: {} training examples keep no target token in a row of {}: a batch of only such "
                     "examples is skipped, not stepped on",
                     s.without_targets, T));
}

// A loss over this rank's share, made the loss over every rank's.
EvalMetrics over_all_ranks(EvalMetrics e, parallel::DataParallel* dp) {
  if (!dp) return e;
  const model::LossSum total = dp->all_reduce_loss({e.loss * static_cast<double>(e.tokens), e.tokens});
  return EvalMetrics{e.step, total.mean(), total.num_tokens};
}

// A prepared dataset: the batch sampler over its training split, and the validation and
// test splits when there are (and are asked for).
void open_prepared(const TrainJob& job, const DataFolder& folder, const text::Tokenizer& tokenizer,
                   model::Llama& model, parallel::PipelineStage* pipeline, const JobRanks& ranks, const InfoSink& info,
                   TrainData& d) {
  const int64_t T = job.train.seq_len;
  d.prepared = std::make_unique<data::TokenDataset>(data::TokenDataset::open(folder.dir, tokenizer));
  const data::TokenDataset& prepared = *d.prepared;
  if (job.mask_prompt && !prepared.index().mask_prompt)
    throw InputError("train", job.data.string() + ": prepared without --mask-prompt; prepare it again with "
                                                  "`flotilla data prepare --mask-prompt`");
  if (job.test && !prepared.has_split(data::Split::test))
    throw InputError("train", job.data.string() + ": --test needs a test split (test.jsonl), and there is none");
  if (!prepared.has_split(data::Split::train))
    throw InputError("train", job.data.string() + ": the prepared dataset has no training examples");
  data::SamplerConfig sc;
  sc.seq_len = T;
  sc.micro_batch = job.train.batch_size;
  sc.grad_accum = job.train.grad_accum;
  sc.pack = job.pack;
  sc.seed = job.seed;
  sc.rank = ranks.data_rank;
  sc.world = ranks.data_world;
  sc.pad_id = std::max(0, tokenizer.pad_id());
  d.train_examples = std::make_unique<data::TokenDataset::SplitExamples>(prepared.examples(data::Split::train));
  check_truncation(data::truncation_at(*d.train_examples, T), "training", T, true, job.data, info);
  // --balance: the trainer cuts each global batch itself, so the sampler reads for every
  // rank (one process's view of the same global batches: the same state, the same ledger).
  data::SamplerConfig train_sc = sc;
  if (job.train.balance_every > 0) {
    train_sc.micro_batch = sc.micro_batch * sc.world;
    train_sc.rank = 0;
    train_sc.world = 1;
  }
  d.train = std::make_unique<data::BatchSampler>(*d.train_examples, train_sc);
  info(fmt::format("data: {} prepared: {} train / {} valid examples ({} / {} tokens), {}", job.data.string(),
                   prepared.num_examples(data::Split::train), prepared.num_examples(data::Split::valid),
                   prepared.num_tokens(data::Split::train), prepared.num_tokens(data::Split::valid),
                   job.pack ? "packed" : "padded"));
  if (job.test) {
    d.test_examples = std::make_unique<data::TokenDataset::SplitExamples>(prepared.examples(data::Split::test));
    // mlx_lm's --test: the test split once, in order, after the last step.
    data::SamplerConfig tc;
    tc.seq_len = T;
    tc.micro_batch = job.train.batch_size;
    tc.pack = job.pack;
    tc.shuffle = false;
    tc.repeat = false;
    tc.rank = ranks.data_rank;
    tc.world = ranks.data_world;
    tc.pad_id = std::max(0, tokenizer.pad_id());
    d.test = [&model, pipeline, &examples = *d.test_examples, tc, max_batches = job.test_batches, dp = job.dp] {
      data::BatchSampler sampler(examples, tc);
      return over_all_ranks(evaluate_loss(model, [&](data::Batch& b) { return sampler.next(b); }, max_batches, pipeline), dp);
    };
  }
  if (prepared.has_split(data::Split::valid)) {
    d.valid_examples = std::make_unique<data::TokenDataset::SplitExamples>(prepared.examples(data::Split::valid));
    check_truncation(data::truncation_at(*d.valid_examples, T), "validation", T, false, job.data, info);
    data::SamplerConfig vc = sc;
    vc.grad_accum = 1;
    vc.shuffle = false;
    vc.repeat = false;
    d.evaluate = [&model, pipeline, &examples = *d.valid_examples, vc, max_batches = job.train.eval_batches, dp = job.dp] {
      data::BatchSampler sampler(examples, vc);
      return over_all_ranks(evaluate_loss(model, [&](data::Batch& b) { return sampler.next(b); }, max_batches, pipeline), dp);
    };
  }
}

// A raw text or JSONL file: one token stream, random training windows and consecutive
// validation windows.
void open_raw_text(const TrainJob& job, const text::Tokenizer& tokenizer, model::Llama& model,
                   parallel::PipelineStage* pipeline, const JobRanks& ranks,
                   const InfoSink& info, TrainData& d) {
  const int64_t T = job.train.seq_len;
  if (job.test) throw InputError("train", job.data.string() + ": --test needs a data folder with test.jsonl");
  const data::TextDataset dataset = data::load_text_dataset(job.data, tokenizer);
  data::StreamSplit split = data::split_train_valid(dataset.tokens, job.valid_fraction);
  if (static_cast<int64_t>(split.train.size()) <= T)
    throw InputError("train", fmt::format("{}: {} training tokens, fewer than one sequence of {} + 1",
                                          job.data.string(), split.train.size(), T));
  const bool have_valid = static_cast<int64_t>(split.valid.size()) > T;
  info(fmt::format("data: {}: {} documents, {} train / {} valid tokens", job.data.string(), dataset.num_documents,
                   split.train.size(), have_valid ? split.valid.size() : 0));
  d.raw_train = std::make_unique<data::RandomWindowSource>(std::move(split.train), job.seed);
  // Ranks draw the same rows and keep their slice: the union is one process's batch.
  // (With --balance the trainer cuts each global batch itself: every rank reads all rows.)
  if (job.dp && job.train.balance_every == 0)
    d.train = std::make_unique<data::RankSlicedSource>(*d.raw_train, ranks.data_rank, ranks.data_world);
  else
    d.train = std::move(d.raw_train);
  if (!have_valid) return;
  d.valid_stream = std::make_unique<data::SequentialWindowSource>(std::move(split.valid));
  d.evaluate = [&model, pipeline, &valid = *d.valid_stream, B = job.train.batch_size, T, ranks,
                max_batches = job.train.eval_batches, dp = job.dp] {
    // The same consecutive windows as one process reads, each rank its slice of them.
    valid.reset();
    data::RankSlicedSource slice(valid, ranks.data_rank, ranks.data_world);
    return over_all_ranks(evaluate_loss(
                              model,
                              [&](data::Batch& b) {
                                b.B = B;
                                b.T = T;
                                slice.next_batch(b);
                                return true;
                              },
                              bounded_eval_batches(valid, B * ranks.data_world, T, max_batches), pipeline),
                          dp);
  };
}

}  // namespace

DataFolder locate_data(TrainJob& job, const model::ModelConfig& cfg, const text::Tokenizer& tokenizer,
                       const InfoSink& info) {
  // A prepared dataset says how long its examples are: unless --seq-len was given, rows are
  // that long (at most the model's positions), so that training does not cut what data
  // prepare kept. (A JSONL folder prepared for this run is cut at --seq-len, below.)
  if (job.seq_len_from_data && std::filesystem::is_directory(job.data) && !data::is_unprepared_data_folder(job.data)) {
    const data::DatasetIndex index = data::TokenDataset::open(job.data).index();
    job.train.seq_len = std::min(data::prepared_seq_len(index), cfg.max_position);
    info(index.max_seq_len > 0
             ? fmt::format("data: rows of {} tokens: {} was prepared with --max-seq-len {} (--seq-len sets another)",
                           job.train.seq_len, job.data.string(), index.max_seq_len)
             : fmt::format("data: rows of {} tokens: the longest training example of {}, up to {} (--seq-len sets "
                           "another)",
                           job.train.seq_len, job.data.string(), data::kLongestDefaultSeqLen));
  }
  // mlx_lm's habit: a folder of JSONL examples given straight to training. It is prepared
  // as `flotilla data prepare` would, into a temporary folder this run removes, before the
  // row length is fixed: without --seq-len, rows follow what the preparation kept.
  DataFolder folder;
  folder.dir = job.data;
  if (data::is_unprepared_data_folder(job.data)) {
    data::PrepareOptions po;
    po.data = job.data;
    po.mask_prompt = job.mask_prompt;
    // As mlx_lm: examples are cut at its --max-seq-length (2048, at most the model's
    // positions) unless --seq-len says otherwise, and rows are as long as the longest kept.
    const int64_t limit = job.seq_len_from_data ? std::min(data::kLongestDefaultSeqLen, cfg.max_position)
                                                : job.train.seq_len;
    po.max_seq_len = static_cast<size_t>(limit);
    po.seed = job.seed;
    folder.on_the_fly = std::make_unique<data::TemporaryPreparedData>(
        po, tokenizer, job.model_dir.empty() ? std::nullopt : data::resolve_chat_template(job.model_dir, ""));
    folder.dir = folder.on_the_fly->dir();
    const data::DatasetIndex& index = folder.on_the_fly->index();
    uint64_t truncated = 0;
    for (const auto& [split, s] : index.splits) truncated += s.stats.truncated;
    info(fmt::format("data: prepared {} for this run (tokenizer {}, chat template {}{}){}", job.data.string(),
                     index.tokenizer_name, index.chat_template.value_or("none"),
                     job.mask_prompt ? ", loss on completions only" : "",
                     truncated > 0 ? fmt::format("; {} examples cut at {} tokens", truncated, limit) : ""));
    if (job.seq_len_from_data) {
      const auto train_split = index.splits.find(data::Split::train);
      const uint64_t longest = train_split == index.splits.end() ? 0 : train_split->second.stats.longest;
      job.train.seq_len = std::clamp<int64_t>(static_cast<int64_t>(longest), 1, limit);
      info(fmt::format("data: rows of {} tokens, the longest training example (--seq-len sets another)",
                       job.train.seq_len));
    }
  }
  if (job.train.seq_len > cfg.max_position)
    throw InputError("train", fmt::format("--seq-len {} exceeds the model's {} positions (max_position_embeddings)",
                                          job.train.seq_len, cfg.max_position));
  return folder;
}

TrainData open_train_data(const TrainJob& job, const DataFolder& folder, const text::Tokenizer& tokenizer,
                          model::Llama& model, parallel::PipelineStage* pipeline, const JobRanks& ranks,
                          const InfoSink& info) {
  if (!folder.on_the_fly && job.mask_prompt && !std::filesystem::is_directory(job.data)) {
    throw InputError("train", job.data.string() + ": --mask-prompt needs a data folder of prompt/completion or chat "
                                                  "examples (train.jsonl, ...)");
  }
  TrainData d;
  if (std::filesystem::is_directory(folder.dir))
    open_prepared(job, folder, tokenizer, model, pipeline, ranks, info, d);
  else
    open_raw_text(job, tokenizer, model, pipeline, ranks, info, d);
  return d;
}

}  // namespace flotilla::train
