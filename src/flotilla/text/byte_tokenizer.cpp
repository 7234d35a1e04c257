#include "flotilla/text/byte_tokenizer.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::text {
namespace {

void check_id(int32_t id) {
  if (id < 0 || id >= ByteTokenizer::kVocabSize) {
    throw Error("text/bytes", fmt::format("token id {} is outside the byte tokenizer's "
                                          "vocabulary [0, {})", id, ByteTokenizer::kVocabSize));
  }
}

}  // namespace

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<uint8_t>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids) const {
  std::string text;
  text.reserve(ids.size());
  for (const int32_t id : ids) {
    check_id(id);
    if (id < 256) text.push_back(static_cast<char>(static_cast<uint8_t>(id)));
  }
  return text;
}

std::string ByteTokenizer::token_to_piece(int32_t id) const {
  check_id(id);
  if (id >= 256) return {};
  return std::string(1, static_cast<char>(static_cast<uint8_t>(id)));
}

void ByteTokenizer::save(const std::filesystem::path& dir) const {
  const nlohmann::ordered_json j = {
      {"type", "bytes"},
      {"vocab_size", kVocabSize},
      {"bos_id", kBos},
      {"eos_id", kEos},
      {"pad_id", kPad},
  };
  write_file_atomic(dir / kFlotillaTokenizerFile, j.dump(2) + "\n");
}

}  // namespace flotilla::text
