// flotilla data prepare: JSONL in, token shards and index.json out, read back through
// TokenDataset; bad input named by file and line; nothing existing clobbered.
#include "flotilla/data/prepare.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <set>

#include "data_test_util.hpp"
#include "flotilla/base/crc32c.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/text/byte_tokenizer.hpp"

namespace flotilla::data {
namespace {

namespace fs = std::filesystem;
using test_util::input_error_of;
using test_util::read_file;
using test_util::TempDir;
using test_util::chatml;
using test_util::kBytes;
using ::testing::HasSubstr;

std::string text_lines(size_t n, const std::string& prefix = "doc") {
  std::string out;
  for (size_t i = 0; i < n; ++i) out += "{\"text\": \"" + prefix + " " + std::to_string(i) + "\"}\n";
  return out;
}

// The text of example i of a split of {"text"} examples (byte tokens between BOS and EOS).
std::string example_text(const TokenDataset& ds, Split split, size_t i) {
  const ExampleView v = ds.example(split, i);
  std::string s;
  for (uint32_t id : v.tokens) {
    if (id < 256) s.push_back(static_cast<char>(id));
  }
  return s;
}

PrepareOptions options_for(const fs::path& data, const fs::path& out) {
  PrepareOptions o;
  o.data = data;
  o.out = out;
  return o;
}

TEST(Prepare, FolderWithThreeSplitsRoundTrips) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(20, "train"));
  dir.file("in/valid.jsonl", text_lines(3, "valid"));
  dir.file("in/test.jsonl", "{\"prompt\": \"Q\", \"completion\": \"A\"}\n");
  const DatasetIndex index = prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  EXPECT_EQ(index.splits.at(Split::train).stats.examples, 20u);
  EXPECT_EQ(index.splits.at(Split::valid).stats.examples, 3u);
  EXPECT_EQ(index.splits.at(Split::test).stats.examples, 1u);

  const TokenDataset ds = TokenDataset::open(dir.path() / "out", kBytes);
  EXPECT_EQ(ds.num_examples(Split::train), 20u);
  EXPECT_EQ(ds.num_examples(Split::valid), 3u);
  EXPECT_EQ(example_text(ds, Split::train, 7), "train 7");
  EXPECT_EQ(example_text(ds, Split::valid, 2), "valid 2");
  const ExampleView t = ds.example(Split::test, 0);
  EXPECT_EQ(t.tokens.size(), 4u);  // BOS Q A EOS
  EXPECT_EQ(ds.index().tokenizer_fingerprint, "bytes-v1");
  EXPECT_FALSE(fs::exists(dir.path() / "out.tmp"));
}

TEST(Prepare, ValidAndTestAreOptional) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(2));
  const DatasetIndex index = prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  EXPECT_EQ(index.splits.size(), 1u);
  const TokenDataset ds = TokenDataset::open(dir.path() / "out");
  EXPECT_FALSE(ds.has_split(Split::valid));
  EXPECT_EQ(ds.num_examples(Split::test), 0u);
}

TEST(Prepare, MissingTrainFileNamesTheFolder) {
  TempDir dir;
  dir.file("in/valid.jsonl", text_lines(2));
  EXPECT_THAT(input_error_of([&] { prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt); }),
              HasSubstr((dir.path() / "in").string() + ": no train.jsonl"));
  EXPECT_FALSE(fs::exists(dir.path() / "out"));
}

TEST(Prepare, BadLineIsNamedByFileAndLineAndNothingIsWritten) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(2));
  dir.file("in/valid.jsonl",
           "{\"text\": \"ok\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"robot\", "
           "\"content\": \"x\"}]}\n");
  const std::string err =
      input_error_of([&] { prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, chatml()); });
  EXPECT_THAT(err, HasSubstr("valid.jsonl:2: message 2 has unknown role 'robot' (expected system, user, assistant)"));
  EXPECT_FALSE(fs::exists(dir.path() / "out"));
  EXPECT_FALSE(fs::exists(dir.path() / "out.tmp"));
}

TEST(Prepare, ConversationTheTemplateRefusesIsALineError) {
  TempDir dir;
  dir.file("in/train.jsonl",
           "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}\n");
  ChatTemplate llama2;
  llama2.family = ChatFamily::llama2;
  EXPECT_THAT(input_error_of([&] { prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, llama2); }),
              HasSubstr("train.jsonl:1: the llama2 template needs roles alternating"));
}

TEST(Prepare, ChatWithoutTemplateSaysSoWithFileAndLine) {
  TempDir dir;
  dir.file("in/train.jsonl", "{\"text\": \"x\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n");
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  o.skip_invalid = true;  // not the line's fault: still fatal
  EXPECT_THAT(input_error_of([&] { prepare(o, kBytes, std::nullopt); }),
              HasSubstr("train.jsonl:2: a {\"messages\"} example needs a chat template"));
}

TEST(Prepare, SkipInvalidCountsReasonsInTheIndex) {
  TempDir dir;
  dir.file("in/train.jsonl",
           "{\"text\": \"a\"}\n{bad\n{\"text\": 1}\n{\"text\": \"b\"}\n"
           "{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}]}\n");
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  o.skip_invalid = true;
  ChatTemplate mistral;
  mistral.family = ChatFamily::mistral;
  const DatasetIndex index = prepare(o, kBytes, mistral);
  const SkipCounts expected = {{"invalid_json", 1}, {"wrong_type", 1}, {"bad_conversation", 1}};
  EXPECT_EQ(index.splits.at(Split::train).stats.skipped, expected);
  EXPECT_EQ(index.splits.at(Split::train).stats.examples, 2u);
  const TokenDataset ds = TokenDataset::open(dir.path() / "out");
  EXPECT_EQ(ds.index().splits.at(Split::train).stats.skipped, expected);
  EXPECT_THAT(format_prepare_summary(index), HasSubstr("3 (bad_conversation 1, invalid_json 1, wrong_type 1)"));
}

TEST(Prepare, MaskPromptDropsExamplesWithNothingToLearn) {
  TempDir dir;
  dir.file("in/train.jsonl",
           "{\"prompt\": \"long prompt\", \"completion\": \"answer\"}\n"
           "{\"messages\": [{\"role\": \"user\", \"content\": \"no answer\"}]}\n");
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  o.mask_prompt = true;
  const DatasetIndex index = prepare(o, kBytes, chatml());
  EXPECT_EQ(index.splits.at(Split::train).stats.examples, 1u);
  EXPECT_EQ(index.splits.at(Split::train).stats.skipped.at("no_trainable_tokens"), 1u);
}

TEST(Prepare, MaskPromptStoresTheMaskOfTheCompletion) {
  TempDir dir;
  dir.file("in/train.jsonl", "{\"prompt\": \"PPP\", \"completion\": \"CC\"}\n");
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  o.mask_prompt = true;
  prepare(o, kBytes, std::nullopt);
  const TokenDataset ds = TokenDataset::open(dir.path() / "out");
  const ExampleView v = ds.example(Split::train, 0);
  ASSERT_EQ(v.tokens.size(), 7u);  // BOS P P P C C EOS
  std::vector<uint8_t> mask(v.mask.size());
  v.mask.unpack(mask);
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 0, 0, 0, 1, 1, 1}));
  EXPECT_EQ(ds.index().splits.at(Split::train).stats.trainable_tokens, 3u);
}

// --mask-prompt with a prompt that fills max_seq_len: the cut leaves no target. Such an
// example is left out under its own reason, and the summary says in words how many
// examples were cut, how many target tokens were lost, and how many were left out.
TEST(Prepare, TruncationThatLeavesNothingToLearnIsCountedAndSaid) {
  TempDir dir;
  dir.file("in/train.jsonl",
           "{\"prompt\": \"a prompt longer than eight\", \"completion\": \"ok\"}\n"  // BOS + 26 prompt bytes
           "{\"prompt\": \"P\", \"completion\": \"a long answer\"}\n"                 // cut inside the answer
           "{\"prompt\": \"P\", \"completion\": \"ok\"}\n");
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  o.mask_prompt = true;
  o.max_seq_len = 8;
  const DatasetIndex index = prepare(o, kBytes, std::nullopt);
  const SplitStats& s = index.splits.at(Split::train).stats;
  EXPECT_EQ(s.examples, 2u);
  EXPECT_EQ(s.truncated, 1u);
  EXPECT_EQ(s.skipped.at(kNoTargetsAfterTruncation), 1u);
  EXPECT_FALSE(s.skipped.contains("no_trainable_tokens"));
  // Targets lost: "ok" + EOS of the first (3), "a long answer" + EOS past token 8 of the
  // second (BOS P + 6 kept: 14 - 6 = 8).
  EXPECT_EQ(s.truncated_targets, 3u + 8u);
  EXPECT_EQ(TokenDataset::open(dir.path() / "out").index().splits.at(Split::train).stats.truncated_targets, 11u);
  const std::string summary = format_prepare_summary(index);
  EXPECT_THAT(summary, HasSubstr("train: 2 of 3 examples are longer than --max-seq-len 8 and were cut: 11 of"));
  EXPECT_THAT(summary, HasSubstr("1 of them kept no target token"));
}

TEST(Prepare, TruncationIsCountedAndLongestReported) {
  TempDir dir;
  dir.file("in/train.jsonl", "{\"text\": \"short\"}\n{\"text\": \"a much longer text\"}\n");
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  o.max_seq_len = 8;
  const DatasetIndex index = prepare(o, kBytes, std::nullopt);
  const SplitStats& s = index.splits.at(Split::train).stats;
  EXPECT_EQ(s.truncated, 1u);
  EXPECT_EQ(s.longest, 8u);
  EXPECT_EQ(s.longest_before_truncation, 20u);  // BOS + 18 bytes + EOS
  EXPECT_EQ(s.tokens, 7u + 8u);
}

TEST(Prepare, SmallShardsSplitASplitAcrossFiles) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(50));
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  o.max_shard_tokens = 40;
  const DatasetIndex index = prepare(o, kBytes, std::nullopt);
  EXPECT_GT(index.splits.at(Split::train).shards.size(), 5u);
  const TokenDataset ds = TokenDataset::open(dir.path() / "out");
  ASSERT_EQ(ds.num_examples(Split::train), 50u);
  for (size_t i = 0; i < 50; ++i) EXPECT_EQ(example_text(ds, Split::train, i), "doc " + std::to_string(i));
}

TEST(Prepare, OneFileSplitsByFractionsDeterministically) {
  TempDir dir;
  const fs::path file = dir.file("all.jsonl", text_lines(100));
  PrepareOptions o = options_for(file, dir.path() / "a");
  o.split = parse_split_fractions("0.9,0.05,0.05");
  o.seed = 3;
  const DatasetIndex a = prepare(o, kBytes, std::nullopt);
  EXPECT_EQ(a.splits.at(Split::train).stats.examples, 90u);
  EXPECT_EQ(a.splits.at(Split::valid).stats.examples, 5u);
  EXPECT_EQ(a.splits.at(Split::test).stats.examples, 5u);
  o.out = dir.path() / "b";
  prepare(o, kBytes, std::nullopt);
  for (const char* name : {"train-00000.fltk", "valid-00000.fltk", "test-00000.fltk"}) {
    EXPECT_EQ(read_file(dir.path() / "a" / name), read_file(dir.path() / "b" / name)) << name;
  }
  // Every line lands in exactly one split, in file order within it.
  const TokenDataset ds = TokenDataset::open(dir.path() / "a");
  std::set<std::string> seen;
  for (Split s : kSplits) {
    int previous = -1;
    for (size_t i = 0; i < ds.num_examples(s); ++i) {
      const std::string t = example_text(ds, s, i);
      const int n = std::stoi(t.substr(4));
      EXPECT_GT(n, previous);
      previous = n;
      seen.insert(t);
    }
  }
  EXPECT_EQ(seen.size(), 100u);
  // Another seed, another valid split.
  o.out = dir.path() / "c";
  o.seed = 4;
  prepare(o, kBytes, std::nullopt);
  EXPECT_NE(read_file(dir.path() / "a" / "valid-00000.fltk"), read_file(dir.path() / "c" / "valid-00000.fltk"));
}

TEST(Prepare, SplitFractionsAreChecked) {
  EXPECT_EQ(parse_split_fractions("0.8,0.2"), (std::array<double, 3>{0.8, 0.2, 0.0}));
  EXPECT_THAT(input_error_of([] { parse_split_fractions("0.9,0.2,0.05"); }), HasSubstr("sum to"));
  EXPECT_THAT(input_error_of([] { parse_split_fractions("0.9,x,0.1"); }), HasSubstr("\"x\" is not a fraction"));
  EXPECT_THAT(input_error_of([] { parse_split_fractions("1"); }), HasSubstr("two or three"));
  EXPECT_THAT(input_error_of([] { parse_split_fractions("0,0.5,0.5"); }), HasSubstr("train fraction"));
  EXPECT_THAT(input_error_of([] { parse_split_fractions("1.5,-0.5"); }), HasSubstr("not a fraction"));
}

TEST(Prepare, OneFileNeedsASplitAndAFolderRefusesOne) {
  TempDir dir;
  const fs::path file = dir.file("all.jsonl", text_lines(3));
  dir.file("in/train.jsonl", text_lines(3));
  EXPECT_THAT(input_error_of([&] { prepare(options_for(file, dir.path() / "o"), kBytes, std::nullopt); }),
              HasSubstr("one file needs --split"));
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "o");
  o.split = std::array<double, 3>{1, 0, 0};
  EXPECT_THAT(input_error_of([&] { prepare(o, kBytes, std::nullopt); }), HasSubstr("--split takes one file"));
  EXPECT_THAT(input_error_of([&] { prepare(options_for(dir.path() / "nope", dir.path() / "o"), kBytes, std::nullopt); }),
              HasSubstr("nope: no such file or folder"));
}

TEST(Prepare, EmptyValidFileIsAnError) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(3));
  dir.file("in/valid.jsonl", "\n");
  EXPECT_THAT(input_error_of([&] { prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt); }),
              HasSubstr("valid.jsonl: empty: no examples"));
}

TEST(Prepare, NonEmptyOutputIsKeptUnlessForced) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(3));
  dir.file("out/precious.txt", "keep me");
  PrepareOptions o = options_for(dir.path() / "in", dir.path() / "out");
  EXPECT_THAT(input_error_of([&] { prepare(o, kBytes, std::nullopt); }), HasSubstr("not empty (pass --force"));
  EXPECT_EQ(read_file(dir.path() / "out/precious.txt"), "keep me");
  o.force = true;
  prepare(o, kBytes, std::nullopt);
  EXPECT_FALSE(fs::exists(dir.path() / "out/precious.txt"));
  EXPECT_TRUE(fs::exists(dir.path() / "out/index.json"));
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(entry.path().filename().string().find(".old"), std::string::npos) << entry.path();
  }
}

TEST(Prepare, EmptyExistingOutputIsUsed) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(3));
  fs::create_directories(dir.path() / "out");
  prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  EXPECT_EQ(TokenDataset::open(dir.path() / "out").num_examples(Split::train), 3u);
}

TEST(Prepare, StaleTmpFolderOfOursIsReplacedAndForeignOneRefused) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(3));
  dir.file("out.tmp/train-00000.fltk", "half written");
  prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  EXPECT_TRUE(fs::exists(dir.path() / "out/index.json"));
  dir.file("o2.tmp/notes.txt", "mine");
  EXPECT_THAT(input_error_of([&] { prepare(options_for(dir.path() / "in", dir.path() / "o2"), kBytes, std::nullopt); }),
              HasSubstr("o2.tmp: exists and is not a folder left by flotilla data prepare"));
  EXPECT_EQ(read_file(dir.path() / "o2.tmp/notes.txt"), "mine");
}

// A tokenizer with another fingerprint, otherwise the byte tokenizer.
class OtherTokenizer final : public text::Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view s) const override { return kBytes.encode(s); }
  std::string decode(std::span<const int32_t> ids) const override { return kBytes.decode(ids); }
  int32_t vocab_size() const override { return kBytes.vocab_size(); }
  int32_t bos_id() const override { return kBytes.bos_id(); }
  int32_t eos_id() const override { return kBytes.eos_id(); }
  bool is_special(int32_t id) const override { return kBytes.is_special(id); }
  std::string token_to_piece(int32_t id) const override { return kBytes.token_to_piece(id); }
  std::string name() const override { return "other"; }
  std::string fingerprint() const override { return "other-v2"; }
  void save(const std::filesystem::path&) const override {}
};

TEST(TokenDataset, FingerprintMismatchSaysToPrepareAgain) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(3));
  prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  const std::string err = input_error_of([&] { TokenDataset::open(dir.path() / "out", OtherTokenizer()); });
  EXPECT_THAT(err, HasSubstr("prepared with tokenizer bytes-v1 (bytes) but the model's tokenizer is other-v2 (other): "
                             "re-run flotilla data prepare"));
}

TEST(TokenDataset, ShardThatDisagreesWithTheIndexIsNamed) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(3));
  prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  // Another valid shard with fewer examples in place of the real one.
  ShardWriter w("bytes-v1", 259);
  w.add(std::vector<int32_t>{1, 2}, std::vector<uint8_t>{1, 1});
  w.write(dir.path() / "out/train-00000.fltk");
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path() / "out"); }),
              HasSubstr("train-00000.fltk: 1 examples, 2 tokens"));
  fs::remove(dir.path() / "out/train-00000.fltk");
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path() / "out"); }), HasSubstr("train-00000.fltk"));
}

TEST(TokenDataset, ShardsCarryChecksumsThatOpeningChecks) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(30));
  const DatasetIndex index = prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  const ShardEntry& entry = index.splits.at(Split::train).shards.at(0);
  ASSERT_TRUE(entry.crc32c.has_value());
  const fs::path shard = dir.path() / "out" / entry.file;
  EXPECT_EQ(*entry.crc32c, crc32c(MappedFile(shard).bytes()));
  // One loss-mask bit flipped: the shard is still well formed (the reader's structural
  // checks pass), so only the checksum can tell.
  std::string bytes = read_text_file(shard);
  bytes.back() = static_cast<char>(bytes.back() ^ 0x01);
  write_file_atomic(shard, bytes);
  EXPECT_NO_THROW(ShardReader{shard});
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path() / "out"); }),
              HasSubstr(entry.file + ": CRC-32C"));
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path() / "out"); }),
              HasSubstr("corrupted; re-run flotilla data prepare"));
}

TEST(TokenDataset, FolderPreparedBeforeChecksumsStillOpens) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(5));
  prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  nlohmann::json j = nlohmann::json::parse(read_text_file(dir.path() / "out/index.json"));
  for (auto& [name, split] : j["splits"].items())
    for (auto& shard : split["shards"]) shard.erase("crc32c");
  write_file_atomic(dir.path() / "out/index.json", j.dump(2));
  const TokenDataset ds = TokenDataset::open(dir.path() / "out");
  EXPECT_EQ(ds.num_examples(Split::train), 5u);
  EXPECT_FALSE(ds.index().splits.at(Split::train).shards.at(0).crc32c.has_value());
  // A malformed checksum is an error, not an absent one.
  j["splits"]["train"]["shards"][0]["crc32c"] = "xyz";
  write_file_atomic(dir.path() / "out/index.json", j.dump(2));
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path() / "out"); }), HasSubstr("is not 8 hex digits"));
}

TEST(TokenDataset, BadIndexIsNamed) {
  TempDir dir;
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path()); }), HasSubstr("no index.json"));
  dir.file("index.json", "{\"format\": \"flotilla-token-shards\", \"version\": 7}");
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path()); }), HasSubstr("index.json: format version 7"));
  dir.file("index.json", "{not json");
  EXPECT_THAT(input_error_of([&] { TokenDataset::open(dir.path()); }), HasSubstr("index.json: not valid JSON"));
}

TEST(TokenDataset, SplitIsAnExampleSourceForTheSampler) {
  TempDir dir;
  dir.file("in/train.jsonl", text_lines(5));
  prepare(options_for(dir.path() / "in", dir.path() / "out"), kBytes, std::nullopt);
  const TokenDataset ds = TokenDataset::open(dir.path() / "out");
  const auto train = ds.examples(Split::train);
  const ExampleSource& source = train;
  EXPECT_EQ(source.num_examples(), 5u);
  EXPECT_EQ(source.example(4).tokens.size(), ds.example(Split::train, 4).tokens.size());
}

}  // namespace
}  // namespace flotilla::data

namespace flotilla::data {
namespace {

// The sample instruction set that scripts/make_sample_data writes (data/pirate/chat).
TEST(Prepare, PirateChatSampleHasTheExpectedCounts) {
  TempDir dir;
  PrepareOptions o = options_for(fs::path(FLOTILLA_SOURCE_DIR) / "data/pirate/chat", dir.path() / "out");
  o.mask_prompt = true;
  const DatasetIndex index = prepare(o, kBytes, chatml());
  ASSERT_EQ(index.splits.size(), 3u);
  const size_t expected[] = {800, 100, 100};
  for (Split s : kSplits) {
    SCOPED_TRACE(std::string(split_name(s)));
    const SplitStats& st = index.splits.at(s).stats;
    EXPECT_EQ(st.examples, expected[static_cast<size_t>(s)]);
    EXPECT_TRUE(st.skipped.empty());
    EXPECT_EQ(st.truncated, 0u);
    EXPECT_GT(st.trainable_tokens, 0u);
    EXPECT_LT(st.trainable_tokens * 2, st.tokens);  // prompts and headers outweigh the answers
  }
  const TokenDataset ds = TokenDataset::open(dir.path() / "out", kBytes);
  EXPECT_EQ(ds.num_examples(Split::train), 800u);
  // Every example's trainable bytes end with the assistant's end-of-turn marker.
  const ExampleView v = ds.example(Split::valid, 0);
  std::string trained;
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    if (v.mask[i]) trained.push_back(static_cast<char>(v.tokens[i]));
  }
  EXPECT_TRUE(trained.ends_with("<|im_end|>")) << trained;
}

TEST(Prepare, PirateCompletionsSampleHasTheExpectedCounts) {
  TempDir dir;
  PrepareOptions o = options_for(fs::path(FLOTILLA_SOURCE_DIR) / "data/pirate/completions", dir.path() / "out");
  o.mask_prompt = true;
  const DatasetIndex index = prepare(o, kBytes, std::nullopt);
  EXPECT_EQ(index.splits.at(Split::train).stats.examples, 800u);
  EXPECT_EQ(index.splits.at(Split::valid).stats.examples, 100u);
  EXPECT_EQ(index.splits.at(Split::test).stats.examples, 100u);
}

}  // namespace
}  // namespace flotilla::data
