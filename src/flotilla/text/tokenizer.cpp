#include "flotilla/text/tokenizer.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/text/byte_tokenizer.hpp"
#include "flotilla/text/hf_tokenizer.hpp"
#include "flotilla/text/sentencepiece_tokenizer.hpp"

namespace flotilla::text {
namespace {

constexpr const char* kTokenizerComponent = "text/tokenizer";

std::unique_ptr<Tokenizer> load_flotilla_tokenizer(const std::filesystem::path& file) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(file));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(kTokenizerComponent, fmt::format("{}: not valid JSON: {}", file.string(),
                                             json_error_text(e)));
  }
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    throw InputError(kTokenizerComponent, fmt::format("{}: expected an object with a string \"type\"",
                                             file.string()));
  }
  const std::string type = j["type"].get<std::string>();
  if (type != "bytes") {
    throw InputError(kTokenizerComponent, fmt::format("{}: unknown tokenizer type \"{}\" (known: \"bytes\")",
                                             file.string(), type));
  }
  // The ids are fixed for "bytes"; written for readers, checked so a file from some
  // other layout is refused rather than silently reinterpreted.
  const std::pair<const char*, int32_t> fixed[] = {
      {"vocab_size", ByteTokenizer::kVocabSize},
      {"bos_id", ByteTokenizer::kBos},
      {"eos_id", ByteTokenizer::kEos},
      {"pad_id", ByteTokenizer::kPad},
  };
  for (const auto& [key, expected] : fixed) {
    if (j.contains(key) && !(j[key].is_number_integer() && j[key].get<int64_t>() == expected)) {
      throw InputError(kTokenizerComponent, fmt::format("{}: \"{}\" is {}, the byte tokenizer's is {}",
                                               file.string(), key, j[key].dump(), expected));
    }
  }
  return std::make_unique<ByteTokenizer>();
}

}  // namespace

TokenizerConfig read_tokenizer_config(const std::filesystem::path& model_dir) {
  const std::filesystem::path file = model_dir / kTokenizerConfigFile;
  std::error_code ec;
  if (!std::filesystem::exists(file, ec)) return {};
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(file));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(kTokenizerComponent, fmt::format("{}: not valid JSON: {}", file.string(),
                                             json_error_text(e)));
  }
  if (!j.is_object()) {
    throw InputError(kTokenizerComponent, fmt::format("{}: expected a JSON object", file.string()));
  }
  const auto flag = [&](const char* key) -> std::optional<bool> {
    if (!j.contains(key) || j[key].is_null()) return std::nullopt;
    if (!j[key].is_boolean()) {
      throw InputError(kTokenizerComponent, fmt::format("{}: \"{}\" is {}, expected true or false",
                                               file.string(), key, j[key].dump()));
    }
    return j[key].get<bool>();
  };
  return TokenizerConfig{.add_bos_token = flag("add_bos_token"),
                         .add_eos_token = flag("add_eos_token")};
}

std::unique_ptr<Tokenizer> Tokenizer::load_for_model(const std::filesystem::path& model_dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(model_dir, ec)) {
    throw InputError(kTokenizerComponent, fmt::format("{}: not a directory", model_dir.string()));
  }
  const std::filesystem::path own = model_dir / kFlotillaTokenizerFile;
  if (std::filesystem::exists(own, ec)) return load_flotilla_tokenizer(own);

  // tokenizer.json before tokenizer.model: Hugging Face directories often carry both, and
  // tokenizer.json is what transformers' (fast) tokenizer runs.
  const std::filesystem::path hf_file = model_dir / "tokenizer.json";
  if (std::filesystem::exists(hf_file, ec)) {
    return load_hf_tokenizer(model_dir);
  }
  const std::filesystem::path spm_file = model_dir / "tokenizer.model";
  if (std::filesystem::exists(spm_file, ec)) {
    return std::make_unique<SentencePieceTokenizer>(spm_file, read_tokenizer_config(model_dir));
  }
  return std::make_unique<ByteTokenizer>();
}

}  // namespace flotilla::text
