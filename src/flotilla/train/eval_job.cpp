#include "flotilla/train/eval_job.hpp"

#include <fmt/format.h>

#include <cmath>
#include <optional>

#include "flotilla/base/error.hpp"
#include "flotilla/data/batch_sampler.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/data/token_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/vocab_check.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::train {

EvalResult run_eval_job(const EvalJob& job) {
  if (job.batch_size <= 0 || job.seq_len <= 0) throw InputError("eval", "--batch-size and --seq-len must be positive");
  model::Llama model = model::Llama::load(job.model_dir, job.non_finite);
  model.set_matmul_input(job.dtype);
  if (job.seq_len > model.config().max_position)
    throw InputError("eval", fmt::format("--seq-len {} exceeds the model's {} positions (max_position_embeddings)",
                                         job.seq_len, model.config().max_position));
  std::optional<model::LoraAdapters> adapters;
  if (!job.adapter_dir.empty()) {
    adapters.emplace(model::LoraAdapters::load(job.adapter_dir, model.config(), job.non_finite));
    model.attach_lora(&*adapters);
  }
  const auto tokenizer = text::Tokenizer::load_for_model(job.model_dir);
  model::check_tokenizer_fits(*tokenizer, model.config(), job.model_dir);
  int64_t batches = 0;
  auto counting = [&batches](const std::function<bool(data::Batch&)>& next) {
    return [&batches, next](data::Batch& b) {
      const bool more = next(b);
      batches += more;
      return more;
    };
  };
  EvalMetrics m;
  if (std::filesystem::is_directory(job.data)) {
    const data::TokenDataset dataset = data::TokenDataset::open(job.data, *tokenizer);
    std::optional<data::Split> split;
    for (data::Split s : data::kSplits)
      if (data::split_name(s) == job.split) split = s;
    if (!split) throw InputError("eval", fmt::format("unknown split '{}' (train, valid or test)", job.split));
    if (!dataset.has_split(*split))
      throw InputError("eval", fmt::format("{}: the prepared dataset has no '{}' examples", job.data.string(), job.split));
    const data::TokenDataset::SplitExamples examples = dataset.examples(*split);
    data::SamplerConfig sc;
    sc.seq_len = job.seq_len;
    sc.micro_batch = job.batch_size;
    sc.pack = job.pack;
    sc.shuffle = false;
    sc.repeat = false;
    sc.pad_id = std::max(0, tokenizer->pad_id());
    data::BatchSampler sampler(examples, sc);
    m = evaluate_loss(model, counting([&](data::Batch& b) { return sampler.next(b); }), job.max_batches);
  } else {
    const data::TextDataset text = data::load_text_dataset(job.data, *tokenizer);
    if (static_cast<int64_t>(text.tokens.size()) <= job.seq_len)
      throw InputError("eval", fmt::format("{}: {} tokens, fewer than one sequence of {} + 1", job.data.string(),
                                           text.tokens.size(), job.seq_len));
    const auto windows = static_cast<int64_t>(
        data::SequentialWindowSource::windows_per_pass(text.tokens.size(), static_cast<int>(job.seq_len)));
    const int64_t pass = std::max<int64_t>(1, windows / job.batch_size);
    data::SequentialWindowSource source(text.tokens);
    m = evaluate_loss(
        model,
        counting([&](data::Batch& b) {
          b.B = job.batch_size;
          b.T = job.seq_len;
          source.next_batch(b);
          return true;
        }),
        job.max_batches > 0 ? std::min(job.max_batches, pass) : pass);
  }
  if (m.tokens == 0) throw InputError("eval", job.data.string() + ": no target tokens to score");
  return EvalResult{job.split, m.loss, std::exp(m.loss), m.tokens, batches};
}

}  // namespace flotilla::train
