// A model and the tokenizer it is run with must agree on the ids: every id the tokenizer
// can produce needs a row of the embedding.
#pragma once

#include <filesystem>

#include "flotilla/model/config.hpp"
#include "flotilla/text/tokenizer.hpp"

namespace flotilla::model {

// InputError naming the model directory (or "the model" when empty), the tokenizer and both
// sizes when the tokenizer's vocabulary is larger than the model's: found when both load,
// instead of at the first out-of-range token.
void check_tokenizer_fits(const text::Tokenizer& tokenizer, const ModelConfig& cfg,
                          const std::filesystem::path& model_dir);

}  // namespace flotilla::model
