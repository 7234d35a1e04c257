// Reading documents (plain text, JSONL) into one BOS + tokens + EOS stream.
#include "flotilla/data/text_dataset.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/text/byte_tokenizer.hpp"
#include "data_test_util.hpp"

namespace flotilla::data {
namespace {

namespace fs = std::filesystem;
using test_util::kBos;
using test_util::kEos;
using test_util::TempDir;

// BOS + bytes + EOS for each document.
std::vector<int32_t> expected_stream(std::initializer_list<std::string> docs) {
  std::vector<int32_t> out;
  for (const std::string& d : docs) {
    out.push_back(kBos);
    for (unsigned char c : d) out.push_back(c);
    out.push_back(kEos);
  }
  return out;
}

std::string load_error(const fs::path& path) {
  try {
    load_text_dataset(path, text::ByteTokenizer());
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(SplitParagraphs, BlankLinesSeparateDocumentsAndInnerNewlinesStay) {
  const auto docs = split_paragraphs("\n\nFirst line\nsecond line\n\n  \t\nNext one.\r\nStill next.\r\n\n\n");
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0], "First line\nsecond line");
  EXPECT_EQ(docs[1], "Next one.\nStill next.");
}

TEST(TextDataset, PlainTextWrapsEachParagraphInBosAndEos) {
  TempDir dir;
  const auto path = dir.file("corpus.txt", "Ahoy.\n\nYo ho\nho.\n");
  const TextDataset ds = load_text_dataset(path, text::ByteTokenizer());
  EXPECT_EQ(ds.format, TextFormat::plain);
  EXPECT_EQ(ds.num_documents, 2u);
  EXPECT_EQ(ds.tokens, expected_stream({"Ahoy.", "Yo ho\nho."}));
}

TEST(TextDataset, JsonlTakesTheTextOfEachLine) {
  TempDir dir;
  const auto path = dir.file("train.jsonl",
                             "{\"text\": \"Arr\"}\n\n{\"id\": 7, \"text\": \"海\\nsea\"}\n{\"text\": \"\"}\n");
  const TextDataset ds = load_text_dataset(path, text::ByteTokenizer());
  EXPECT_EQ(ds.format, TextFormat::jsonl);
  EXPECT_EQ(ds.num_documents, 2u);  // the empty text is skipped
  EXPECT_EQ(ds.tokens, expected_stream({"Arr", "海\nsea"}));
}

TEST(TextDataset, JsonlIsDetectedByContentWithoutTheExtension) {
  TempDir dir;
  const auto path = dir.file("data.txt", "\xEF\xBB\xBF  \n{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
  const TextDataset ds = load_text_dataset(path, text::ByteTokenizer());
  EXPECT_EQ(ds.format, TextFormat::jsonl);
  EXPECT_EQ(ds.tokens, expected_stream({"a", "b"}));
}

TEST(TextDataset, LineThatIsNotJsonNamesFileAndLine) {
  TempDir dir;
  const auto path = dir.file("bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": oops}\n");
  const std::string msg = load_error(path);
  EXPECT_NE(msg.find("[data/text] " + path.string() + ":3: not valid JSON"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

TEST(TextDataset, LineThatIsNotAnObjectNamesFileAndLine) {
  TempDir dir;
  const auto path = dir.file("bad.jsonl", "[\"text\"]\n");
  const std::string msg = load_error(path);
  EXPECT_NE(msg.find(path.string() + ":1: expected a JSON object"), std::string::npos) << msg;
}

TEST(TextDataset, MissingTextFieldNamesFileAndLine) {
  TempDir dir;
  const auto path = dir.file("bad.jsonl", "{\"text\": \"a\"}\n{\"body\": \"b\"}\n");
  const std::string msg = load_error(path);
  EXPECT_NE(msg.find(path.string() + ":2: missing the \"text\" field"), std::string::npos) << msg;
}

TEST(TextDataset, NonStringTextNamesFileAndLine) {
  TempDir dir;
  const auto path = dir.file("bad.jsonl", "{\"text\": 42}\n");
  const std::string msg = load_error(path);
  EXPECT_NE(msg.find(path.string() + ":1: \"text\" is a number, expected a string"), std::string::npos)
      << msg;
}

TEST(TextDataset, PromptCompletionLinesSayNotSupportedYet) {
  TempDir dir;
  const auto path = dir.file("bad.jsonl", "{\"prompt\": \"q\", \"completion\": \"a\"}\n");
  EXPECT_NE(load_error(path).find(":1: prompt/completion and chat lines are not supported yet"),
            std::string::npos);
}

TEST(TextDataset, EmptyFileIsAnErrorNamingIt) {
  TempDir dir;
  const auto path = dir.file("empty.txt", "\n  \n\n");
  const std::string msg = load_error(path);
  EXPECT_NE(msg.find(path.string() + ": no documents"), std::string::npos) << msg;
}

TEST(TextDataset, JsonlWithOnlyEmptyTextsIsAnError) {
  TempDir dir;
  const auto path = dir.file("empty.jsonl", "{\"text\": \"\"}\n");
  EXPECT_NE(load_error(path).find("no documents"), std::string::npos);
}

TEST(TextDataset, MissingFileIsAnInputError) {
  EXPECT_THROW(load_text_dataset("/nonexistent/corpus.txt", text::ByteTokenizer()), InputError);
}

TEST(TextDataset, SampleCorpusLoadsInBothFormats) {
  const fs::path dir = fs::path(FLOTILLA_SOURCE_DIR) / "data" / "sample";
  // Committed to git; scripts/make_sample_data regenerates them.
  ASSERT_TRUE(fs::exists(dir / "corpus.txt")) << dir;
  const TextDataset txt = load_text_dataset(dir / "corpus.txt", text::ByteTokenizer());
  const TextDataset jsonl = load_text_dataset(dir / "corpus.jsonl", text::ByteTokenizer());
  EXPECT_GT(txt.num_documents, jsonl.num_documents);
  EXPECT_GT(jsonl.num_documents, 100u);
  // The JSONL holds the first paragraphs of the text file, so its stream is a prefix.
  ASSERT_LE(jsonl.tokens.size(), txt.tokens.size());
  EXPECT_TRUE(std::equal(jsonl.tokens.begin(), jsonl.tokens.end(), txt.tokens.begin()));
}

TEST(SplitTrainValid, LastFractionIsValidation) {
  std::vector<int32_t> stream(100);
  for (int i = 0; i < 100; ++i) stream[i] = i;
  const StreamSplit split = split_train_valid(stream, 0.1);
  ASSERT_EQ(split.train.size(), 90u);
  ASSERT_EQ(split.valid.size(), 10u);
  EXPECT_EQ(split.train.back(), 89);
  EXPECT_EQ(split.valid.front(), 90);
  EXPECT_TRUE(split_train_valid(stream, 0.0).valid.empty());
  EXPECT_THROW(split_train_valid(stream, 1.0), InputError);
  EXPECT_THROW(split_train_valid(stream, -0.5), InputError);
}

}  // namespace
}  // namespace flotilla::data
