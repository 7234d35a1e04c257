#include "flotilla/model/vocab_check.hpp"

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla::model {

void check_tokenizer_fits(const text::Tokenizer& tokenizer, const ModelConfig& cfg,
                          const std::filesystem::path& model_dir) {
  if (tokenizer.vocab_size() <= cfg.vocab_size) return;
  throw InputError("model", fmt::format("{}: the tokenizer ({}) has {} tokens but the model's vocabulary (vocab_size "
                                        "in config.json) is {}: ids from {} up would have no embedding row",
                                        model_dir.empty() ? std::string("the model") : model_dir.string(),
                                        tokenizer.name().empty() ? std::string("unnamed") : tokenizer.name(),
                                        tokenizer.vocab_size(), cfg.vocab_size, cfg.vocab_size));
}

}  // namespace flotilla::model
