// The byte tokenizer and the model-directory factory.
#include "flotilla/text/byte_tokenizer.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/base/file.hpp"
#include "../temp_dir.hpp"

namespace flotilla::text {
namespace {

namespace fs = std::filesystem;

// A fresh empty directory per test, removed afterwards.
using ::flotilla::testing::TempDir;

using ::flotilla::testing::write_text;

std::string error_of(const fs::path& dir) {
  try {
    Tokenizer::load_for_model(dir);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(ByteTokenizer, EncodesEachByteAsItsValueWithoutBosOrEos) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.encode("Ahoy"), (std::vector<int32_t>{65, 104, 111, 121}));
  EXPECT_TRUE(tok.encode("").empty());
  EXPECT_EQ(tok.encode(std::string("\x00\xff", 2)), (std::vector<int32_t>{0, 255}));
}

TEST(ByteTokenizer, RoundTripsUtf8IncludingCjkAndEmoji) {
  ByteTokenizer tok;
  const std::string text = "Arr, matey! café — 海賊の船 🏴‍☠️⚓ Ωmega\n\ttab";
  const std::vector<int32_t> ids = tok.encode(text);
  EXPECT_EQ(ids.size(), text.size());  // one token per byte
  EXPECT_EQ(tok.decode(ids), text);
}

TEST(ByteTokenizer, RoundTripsEveryByteValue) {
  ByteTokenizer tok;
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  EXPECT_EQ(tok.decode(tok.encode(all)), all);
}

TEST(ByteTokenizer, SpecialIdsFollowTheBytes) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.bos_id(), 256);
  EXPECT_EQ(tok.eos_id(), 257);
  EXPECT_EQ(tok.pad_id(), 258);
  EXPECT_EQ(tok.vocab_size(), 259);
  EXPECT_EQ(tok.name(), "bytes");
  EXPECT_FALSE(tok.is_special(0));
  EXPECT_FALSE(tok.is_special(255));
  EXPECT_TRUE(tok.is_special(256));
  EXPECT_TRUE(tok.is_special(258));
}

TEST(ByteTokenizer, DecodeSkipsSpecialTokens) {
  ByteTokenizer tok;
  const std::vector<int32_t> ids = {256, 'y', 'o', 257, 258, 'h', 'o', 257};
  EXPECT_EQ(tok.decode(ids), "yoho");
}

TEST(ByteTokenizer, PiecesConcatenateToDecode) {
  ByteTokenizer tok;
  std::vector<int32_t> ids = {256};
  for (int32_t id : tok.encode("海 ⚓")) ids.push_back(id);
  ids.push_back(257);
  std::string pieces;
  for (int32_t id : ids) pieces += tok.token_to_piece(id);
  EXPECT_EQ(pieces, tok.decode(ids));
  EXPECT_EQ(tok.token_to_piece('A'), "A");
  EXPECT_EQ(tok.token_to_piece(0xE6), std::string(1, '\xE6'));  // one byte of a code point
  EXPECT_EQ(tok.token_to_piece(257), "");
}

TEST(ByteTokenizer, IdsOutsideTheVocabularyAreErrors) {
  ByteTokenizer tok;
  const std::vector<int32_t> bad = {'a', 300};
  EXPECT_THROW(tok.decode(bad), Error);
  EXPECT_THROW(tok.token_to_piece(-1), Error);
  EXPECT_THROW(tok.token_to_piece(259), Error);
}

TEST(TokenizerLoad, DirectoryWithoutTokenizerFileGivesBytes) {
  TempDir dir;
  EXPECT_EQ(Tokenizer::load_for_model(dir.path())->name(), "bytes");
}

TEST(TokenizerLoad, SaveThenLoadGivesByteTokenizer) {
  TempDir dir;
  ByteTokenizer().save(dir.path());
  ASSERT_TRUE(fs::exists(dir.path() / "flotilla_tokenizer.json"));
  const std::string saved = read_text_file(dir.path() / "flotilla_tokenizer.json");
  EXPECT_NE(saved.find("\"type\": \"bytes\""), std::string::npos) << saved;
  const auto tok = Tokenizer::load_for_model(dir.path());
  EXPECT_EQ(tok->name(), "bytes");
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->decode(tok->encode("yo-ho")), "yo-ho");
}

TEST(TokenizerLoad, MinimalFlotillaFileGivesBytes) {
  TempDir dir;
  write_text(dir.path() / "flotilla_tokenizer.json", R"({"type":"bytes"})");
  EXPECT_EQ(Tokenizer::load_for_model(dir.path())->name(), "bytes");
}

TEST(TokenizerLoad, UnusableTokenizerJsonNamesTheFile) {
  TempDir dir;
  write_text(dir.path() / "tokenizer.json", "{}");
  const std::string msg = error_of(dir.path());
  EXPECT_NE(msg.find("tokenizer.json"), std::string::npos) << msg;
}

TEST(TokenizerLoad, CorruptSentencePieceModelNamesTheFile) {
  TempDir dir;
  write_text(dir.path() / "tokenizer.model", "x");
  const std::string msg = error_of(dir.path());
  EXPECT_NE(msg.find("tokenizer.model"), std::string::npos) << msg;
}

TEST(TokenizerLoad, UnknownTypeNamesTheFile) {
  TempDir dir;
  write_text(dir.path() / "flotilla_tokenizer.json", R"({"type":"bpe"})");
  const std::string msg = error_of(dir.path());
  EXPECT_NE(msg.find("flotilla_tokenizer.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"bpe\""), std::string::npos) << msg;
}

TEST(TokenizerLoad, MalformedJsonNamesTheFile) {
  TempDir dir;
  write_text(dir.path() / "flotilla_tokenizer.json", R"({"type": )");
  const std::string msg = error_of(dir.path());
  EXPECT_NE(msg.find("flotilla_tokenizer.json: not valid JSON"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

TEST(TokenizerLoad, MismatchedIdsAreRefused) {
  TempDir dir;
  write_text(dir.path() / "flotilla_tokenizer.json", R"({"type":"bytes","eos_id":2})");
  EXPECT_NE(error_of(dir.path()).find("eos_id"), std::string::npos);
}

TEST(TokenizerLoad, MissingDirectoryIsAnInputError) {
  EXPECT_THROW(Tokenizer::load_for_model("/nonexistent/flotilla/model"), InputError);
}

}  // namespace
}  // namespace flotilla::text
