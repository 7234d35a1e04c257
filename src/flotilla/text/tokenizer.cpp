#include "flotilla/text/tokenizer.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/text/byte_tokenizer.hpp"

namespace flotilla::text {
namespace {

constexpr const char* kComponent = "text/tokenizer";

// nlohmann's message without its "[json.exception.parse_error.101] " tag.
std::string json_error_text(const nlohmann::json::exception& e) {
  std::string_view what = e.what();
  if (!what.empty() && what.front() == '[') {
    if (const size_t end = what.find("] "); end != std::string_view::npos) what.remove_prefix(end + 2);
  }
  return std::string(what);
}

std::unique_ptr<Tokenizer> load_flotilla_tokenizer(const std::filesystem::path& file) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(file));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(kComponent, fmt::format("{}: not valid JSON: {}", file.string(),
                                             json_error_text(e)));
  }
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    throw InputError(kComponent, fmt::format("{}: expected an object with a string \"type\"",
                                             file.string()));
  }
  const std::string type = j["type"].get<std::string>();
  if (type != "bytes") {
    throw InputError(kComponent, fmt::format("{}: unknown tokenizer type \"{}\" (known: \"bytes\")",
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
      throw InputError(kComponent, fmt::format("{}: \"{}\" is {}, the byte tokenizer's is {}",
                                               file.string(), key, j[key].dump(), expected));
    }
  }
  return std::make_unique<ByteTokenizer>();
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load_for_model(const std::filesystem::path& model_dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(model_dir, ec)) {
    throw InputError(kComponent, fmt::format("{}: not a directory", model_dir.string()));
  }
  const std::filesystem::path own = model_dir / kFlotillaTokenizerFile;
  if (std::filesystem::exists(own, ec)) return load_flotilla_tokenizer(own);
  const std::pair<const char*, const char*> unsupported[] = {
      {"tokenizer.json", "Hugging Face tokenizer.json (BPE)"},
      {"tokenizer.model", "SentencePiece tokenizer.model"},
  };
  for (const auto& [name, what] : unsupported) {
    const std::filesystem::path file = model_dir / name;
    if (std::filesystem::exists(file, ec)) {
      throw InputError(kComponent,
                       fmt::format("{}: {} is not supported yet; only the byte tokenizer is "
                                   "({} with {{\"type\": \"bytes\"}}, or no tokenizer file)",
                                   file.string(), what, kFlotillaTokenizerFile));
    }
  }
  return std::make_unique<ByteTokenizer>();
}

}  // namespace flotilla::text
