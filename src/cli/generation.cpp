#include "cli/generation.hpp"

#include <fmt/format.h>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/model/decoder.hpp"
#include "flotilla/model/vocab_check.hpp"
#include "flotilla/text/stop_strings.hpp"
#include "flotilla/text/utf8_streamer.hpp"

namespace flotilla::cli {

LoadedModel load_for_generation(const std::filesystem::path& model_dir, const std::filesystem::path& adapter,
                                bool strict, const std::string& dtype) {
  LoadedModel loaded{model::Llama::load(model_dir, non_finite_policy(strict)), std::nullopt, nullptr};
  loaded.model.set_matmul_input(matmul_dtype_of(dtype));
  // Generation has no dropout, so merged adapters compute exactly what attached ones do.
  if (!adapter.empty()) {
    model::LoraAdapters adapters = model::LoraAdapters::load(adapter, loaded.model.config(), non_finite_policy(strict));
    if (loaded.model.quantized())
      loaded.side_adapters.emplace(std::move(adapters));
    else
      adapters.merge_into(loaded.model.params(), loaded.model.layout());
  }
  loaded.tokenizer = text::Tokenizer::load_for_model(model_dir);
  model::check_tokenizer_fits(*loaded.tokenizer, loaded.model.config(), model_dir);
  return loaded;
}

std::string generate_answer(const LoadedModel& loaded, std::span<const int32_t> prompt, int64_t max_tokens,
                            model::Sampler& sampler, const std::vector<std::string>& stop_texts,
                            const std::function<void(const std::string&)>& emit, AnswerStats* stats) {
  const model::Llama& model = loaded.model;
  const text::Tokenizer& tokenizer = *loaded.tokenizer;
  if (prompt.empty()) throw InputError("generate", "empty prompt and no BOS token: nothing to condition on");
  const int64_t limit =
      std::min<int64_t>(static_cast<int64_t>(prompt.size()) + max_tokens, model.config().max_position);
  if (static_cast<int64_t>(prompt.size()) >= limit)
    throw InputError("generate", fmt::format("prompt of {} tokens fills the model's context of {}", prompt.size(),
                                             model.config().max_position));
  model::Decoder decoder(model, limit, loaded.side_adapters ? &*loaded.side_adapters : nullptr);
  text::Utf8Streamer stream;
  text::StopStrings stops(stop_texts);
  std::string answer;
  auto out = [&](const std::string& piece) {
    if (piece.empty()) return;
    answer += piece;
    emit(piece);
  };
  Timer prefill_timer;
  std::span<const float> logits = decoder.step(prompt);
  const double prefill_s = prefill_timer.elapsed_s();
  // Draws are limited to the tokenizer's ids: a padded embedding's extra rows are not text.
  const auto vocab = static_cast<size_t>(tokenizer.vocab_size());
  Timer decode_timer;
  int64_t generated = 0;
  while (decoder.position() < limit) {
    const int32_t next = sampler.sample(logits.first(std::min(vocab, logits.size())));
    ++generated;
    if (next == tokenizer.eos_id()) break;
    out(stops.push(stream.push(tokenizer.token_to_piece(next))));
    if (stops.stopped() || decoder.position() >= limit) break;
    logits = decoder.step(std::span<const int32_t>(&next, 1));
  }
  out(stops.push(stream.finish()) + stops.finish());
  if (stats) *stats = {static_cast<int64_t>(prompt.size()), generated, prefill_s, decode_timer.elapsed_s()};
  return answer;
}

}  // namespace flotilla::cli
