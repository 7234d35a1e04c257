// What `generate` and `chat` share: a model loaded with its adapter and tokenizer, and
// one answer sampled with the KV cache, streamed piece by piece and cut at stop strings.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "flotilla/model/llama.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/sampling.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::cli {

struct LoadedModel {
  model::Llama model;
  // A quantized base cannot be merged into in place: its adapters run alongside.
  std::optional<model::LoraAdapters> side_adapters;
  std::unique_ptr<text::Tokenizer> tokenizer;
};

// The model of `model_dir` with `adapter` (a PEFT or mlx_lm folder; empty: none) merged in,
// or attached alongside a quantized base, and its tokenizer (checked against the model).
// `dtype`: --dtype's value, the number format of the matrix products.
LoadedModel load_for_generation(const std::filesystem::path& model_dir, const std::filesystem::path& adapter,
                                bool strict, const std::string& dtype);

struct AnswerStats {
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double prefill_s = 0.0, decode_s = 0.0;
};

// Samples at most `max_tokens` after `prompt` (at most to the model's context), ending at EOS
// or at one of `stops` (not emitted). Each piece of text goes to `emit` as soon as it is
// whole UTF-8; the text emitted is returned. InputError when the prompt fills the context.
std::string generate_answer(const LoadedModel& loaded, std::span<const int32_t> prompt, int64_t max_tokens,
                            model::Sampler& sampler, const std::vector<std::string>& stops,
                            const std::function<void(const std::string&)>& emit, AnswerStats* stats = nullptr);

}  // namespace flotilla::cli
