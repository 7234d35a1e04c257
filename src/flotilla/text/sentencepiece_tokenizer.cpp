#include "flotilla/text/sentencepiece_tokenizer.hpp"

#include <fmt/format.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "flotilla/base/error.hpp"
#include "flotilla/base/hash.hpp"
#include "flotilla/base/file.hpp"

namespace flotilla::text {
namespace {

constexpr const char* kSentencepieceTokenizerComponent = "text/sentencepiece";
constexpr std::string_view kSpaceSymbol = "\xe2\x96\x81";  // U+2581 "▁"

// SentencePiece's ids are `int`; ours are int32_t. Same type here, so vectors move as is.
static_assert(std::is_same_v<int, int32_t>);

std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

// "<0x0A>" -> 0x0A; -1 when `piece` is not a byte piece.
int byte_of_piece(std::string_view piece) {
  if (piece.size() != 6 || !piece.starts_with("<0x") || piece.back() != '>') return -1;
  int value = 0;
  for (const char c : piece.substr(3, 2)) {
    int digit = -1;
    if (c >= '0' && c <= '9') digit = c - '0';
    if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
    if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

std::string replace_space_symbols(std::string_view piece) {
  std::string out;
  out.reserve(piece.size());
  for (size_t i = 0; i < piece.size();) {
    if (piece.substr(i).starts_with(kSpaceSymbol)) {
      out.push_back(' ');
      i += kSpaceSymbol.size();
    } else {
      out.push_back(piece[i++]);
    }
  }
  return out;
}

std::string fnv1a64_hex(std::string_view bytes) { return fmt::format("{:016x}", fnv1a64(bytes)); }

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(const std::filesystem::path& model_file,
                                               const TokenizerConfig& config)
    : model_file_(model_file),
      model_bytes_(read_text_file(model_file)),
      processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  // From the bytes already read, so the fingerprint and the model are the same file.
  const auto status = processor_->LoadFromSerializedProto(model_bytes_);
  if (!status.ok()) {
    throw InputError(kSentencepieceTokenizerComponent, fmt::format("{}: not a valid SentencePiece model ({})",
                                             model_file.string(), one_line(status.message())));
  }
  vocab_size_ = processor_->GetPieceSize();
  bos_id_ = processor_->bos_id();
  eos_id_ = processor_->eos_id();
  pad_id_ = processor_->pad_id();
  unk_id_ = processor_->unk_id();
  add_bos_ = config.add_bos_token.value_or(true) && bos_id_ >= 0;
  add_eos_ = config.add_eos_token.value_or(false) && eos_id_ >= 0;
  fingerprint_ = fnv1a64_hex(model_bytes_);

  // What each id decodes to on its own, away from the start of a text. The unknown
  // piece's surface lives in the trainer spec (not in the public header), so ask the
  // decoder, which maps it before any leading-space handling.
  pieces_.resize(vocab_size_);
  is_control_.assign(vocab_size_, false);
  for (int32_t id = 0; id < vocab_size_; ++id) {
    const std::string& piece = processor_->IdToPiece(id);
    if (processor_->IsControl(id)) {
      is_control_[id] = true;
    } else if (processor_->IsUnknown(id)) {
      pieces_[id] = decode(std::span<const int32_t>(&id, 1));
    } else if (const int byte = processor_->IsByte(id) ? byte_of_piece(piece) : -1; byte >= 0) {
      pieces_[id] = std::string(1, static_cast<char>(byte));
    } else {
      pieces_[id] = replace_space_symbols(piece);
    }
  }

  // Whether the decoder drops the leading "▁" (add_dummy_prefix or remove_extra_whitespaces
  // in the model's normalizer spec, which the public header does not expose): decode one
  // piece that starts with it and look.
  for (int32_t id = 0; id < vocab_size_; ++id) {
    if (is_control_[id] || processor_->IsUnknown(id) || processor_->IsByte(id)) continue;
    if (!processor_->IdToPiece(id).starts_with(kSpaceSymbol)) continue;
    strips_leading_space_ = decode(std::span<const int32_t>(&id, 1)) != pieces_[id];
    break;
  }
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = processor_->Encode(text, &ids);
  if (!status.ok()) {
    throw Error(kSentencepieceTokenizerComponent, fmt::format("{}: encode failed: {}", model_file_.string(),
                                        one_line(status.message())));
  }
  return ids;
}

std::string SentencePieceTokenizer::decode(std::span<const int32_t> ids) const {
  for (const int32_t id : ids) {
    if (id < 0 || id >= vocab_size_) {
      throw Error(kSentencepieceTokenizerComponent, fmt::format("token id {} is outside the vocabulary [0, {}) of {}",
                                          id, vocab_size_, model_file_.string()));
    }
  }
  std::string text;
  const auto status = processor_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  if (!status.ok()) {
    throw Error(kSentencepieceTokenizerComponent, fmt::format("{}: decode failed: {}", model_file_.string(),
                                        one_line(status.message())));
  }
  return text;
}

bool SentencePieceTokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size_ && is_control_[id];
}

std::string SentencePieceTokenizer::token_to_piece(int32_t id) const {
  if (id < 0 || id >= vocab_size_) {
    throw Error(kSentencepieceTokenizerComponent, fmt::format("token id {} is outside the vocabulary [0, {}) of {}",
                                        id, vocab_size_, model_file_.string()));
  }
  return pieces_[id];
}

void SentencePieceTokenizer::save(const std::filesystem::path& dir) const {
  write_file_atomic(dir / "tokenizer.model", model_bytes_);

  // A tokenizer_config.json already there (chat template, special tokens, ...) keeps
  // everything but the two keys this tokenizer owns.
  const std::filesystem::path config_file = dir / kTokenizerConfigFile;
  nlohmann::ordered_json config = nlohmann::ordered_json::object();
  std::error_code ec;
  if (std::filesystem::exists(config_file, ec)) {
    try {
      config = nlohmann::ordered_json::parse(read_text_file(config_file));
    } catch (const nlohmann::json::exception&) {
      config = nullptr;
    }
    if (!config.is_object()) {
      throw InputError(kSentencepieceTokenizerComponent, fmt::format("{}: exists and is not a JSON object; not "
                                               "overwriting it", config_file.string()));
    }
  }
  config["add_bos_token"] = add_bos_;
  config["add_eos_token"] = add_eos_;
  write_file_atomic(config_file, config.dump(2) + "\n");
}

}  // namespace flotilla::text
