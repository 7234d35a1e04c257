// HfTokenizer on hand-made tokenizer.json files whose right answers can be worked out by
// hand: split patterns, merge order, byte fallback, unk, added tokens, BOS/EOS settings,
// errors. The comparison with Hugging Face's own implementation on the trained tokenizers
// is in hf_reference_test.cpp.
#include "flotilla/text/hf_tokenizer.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "flotilla/base/error.hpp"
#include "flotilla/text/hf_components.hpp"
#include "flotilla/text/hf_pretokenize.hpp"
#include "flotilla/text/unicode_nfc.hpp"
#include "hf_test_util.hpp"

namespace flotilla::text {
namespace {

using hf_test::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;

using Merges = std::vector<std::pair<std::string, std::string>>;
const std::string kSp = "\xE2\x96\x81";  // ▁

std::vector<std::string> split(SplitPattern pattern, std::string_view text) {
  std::vector<std::string_view> pieces;
  split_with_pattern(pattern, text, pieces);
  return {pieces.begin(), pieces.end()};
}

// Byte-level BPE: ids 0..255 are the bytes (spelled in GPT-2's alphabet), then one id per
// merge result from 256 up, in merge order. Pre-tokenizer ByteLevel with the GPT-2 regex.
json byte_level_json(const Merges& merges, json added = json::array(), bool ignore_merges = false) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[hf::bytes_to_alphabet(std::string(1, static_cast<char>(b)))] = b;
  json merges_json = json::array();
  int next = 256;
  for (const auto& [left, right] : merges) {
    const std::string l = hf::bytes_to_alphabet(left);
    const std::string r = hf::bytes_to_alphabet(right);
    merges_json.push_back(l + " " + r);
    if (!vocab.contains(l + r)) vocab[l + r] = next++;
  }
  return {{"version", "1.0"},
          {"added_tokens", std::move(added)},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_json}, {"ignore_merges", ignore_merges}}}};
}

// SentencePiece-style BPE, Llama 2 layout: <unk> <s> </s>, <0x00>..<0xFF> = 3..258,
// ▁=259 a=260 b=261, then ▁a=262 ab=263 ▁ab=264 from the merges (▁ a), (a b), (▁a b).
json sentencepiece_json(bool byte_fallback, bool fuse_unk, bool with_unk = true) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) vocab[fmt::format("<0x{:02X}>", b)] = 3 + b;
  vocab[kSp] = 259;
  vocab["a"] = 260;
  vocab["b"] = 261;
  vocab[kSp + "a"] = 262;
  vocab["ab"] = 263;
  vocab[kSp + "ab"] = 264;
  auto special = [](int id, const char* content) {
    return json{{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", false}, {"special", true}};
  };
  return {{"added_tokens", {special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")}},
          {"normalizer", {{"type", "Sequence"}, {"normalizers", {
              {{"type", "Prepend"}, {"prepend", kSp}},
              {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSp}}}}}},
          {"pre_tokenizer", nullptr},
          {"post_processor", nullptr},
          {"decoder", {{"type", "Sequence"}, {"decoders", {
              {{"type", "Replace"}, {"pattern", {{"String", kSp}}}, {"content", " "}},
              {{"type", "ByteFallback"}}, {{"type", "Fuse"}},
              {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {kSp + " a", "a b", kSp + "a b"}},
                     {"unk_token", with_unk ? json("<unk>") : json(nullptr)},
                     {"byte_fallback", byte_fallback}, {"fuse_unk", fuse_unk}}}};
}

json added_token(int id, const std::string& content, bool special, json flags = json::object()) {
  json t = {{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false},
            {"rstrip", false}, {"normalized", false}, {"special", special}};
  t.update(flags);
  return t;
}

HfTokenizer load(const TempDir& dir, const json& tokenizer, const json* config = nullptr) {
  hf_test::write_file(dir / "tokenizer.json", tokenizer.dump());
  if (config) hf_test::write_file(dir / "tokenizer_config.json", config->dump());
  return HfTokenizer(dir / "tokenizer.json", config ? dir / "tokenizer_config.json" : fs::path());
}

std::string load_error(const TempDir& dir, const std::string& tokenizer_text) {
  hf_test::write_file(dir / "tokenizer.json", tokenizer_text);
  try {
    HfTokenizer tok(dir / "tokenizer.json");
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

using Ids = std::vector<int32_t>;

// ---- split patterns -------------------------------------------------------------------

TEST(HfSplitPattern, Llama3FollowsTheRegexAlternativesInOrder) {
  EXPECT_EQ(split(SplitPattern::kLlama3, "Hello world  foo\n\n bar's 12345 DON'T"),
            (std::vector<std::string>{"Hello", " world", " ", " foo", "\n\n", " bar", "'s", " ",
                                      "123", "45", " DON", "'T"}));
  // A non-letter binds to the letters after it; punctuation keeps its trailing newlines.
  EXPECT_EQ(split(SplitPattern::kLlama3, "(hello x...\n\ny"),
            (std::vector<std::string>{"(hello", " x", "...\n\n", "y"}));
  EXPECT_EQ(split(SplitPattern::kLlama3, "a \t\n  b   "),
            (std::vector<std::string>{"a", " \t\n", " ", " b", "   "}));
}

TEST(HfSplitPattern, Llama3ContractionsIgnoreCaseIncludingLongS) {
  EXPECT_EQ(split(SplitPattern::kLlama3, "'RE'Ll'\xC5\xBF"),  // 'ſ folds to 's
            (std::vector<std::string>{"'RE", "'Ll", "'\xC5\xBF"}));
}

TEST(HfSplitPattern, Gpt2ContractionsAreCaseSensitiveAndSpaceBindsToNumbers) {
  EXPECT_EQ(split(SplitPattern::kGpt2, "Hello world  foo\n\n bar's 12345 DON'T"),
            (std::vector<std::string>{"Hello", " world", " ", " foo", "\n\n", " bar", "'s",
                                      " 12345", " DON", "'", "T"}));
}

TEST(HfSplitPattern, Qwen2TakesOneDigitAtATime) {
  EXPECT_EQ(split(SplitPattern::kQwen2, "x 2024"),
            (std::vector<std::string>{"x", " ", "2", "0", "2", "4"}));
}

TEST(HfSplitPattern, NonAsciiLettersNumbersAndSpacesUseTheUnicodeTable) {
  // é is a letter, ½ a number (No), U+3000 a space, 😀 neither.
  EXPECT_EQ(split(SplitPattern::kGpt2, "caf\xC3\xA9 \xC2\xBD\xE3\x80\x80\xF0\x9F\x98\x80!"),
            (std::vector<std::string>{"caf\xC3\xA9", " \xC2\xBD", "\xE3\x80\x80", "\xF0\x9F\x98\x80!"}));
}

TEST(HfSplitPattern, InvalidUtf8BytesAreSplitNotDropped) {
  const std::string text = "ab\xFF\xC3 c\x80";
  std::string joined;
  for (const std::string& piece : split(SplitPattern::kLlama3, text)) joined += piece;
  EXPECT_EQ(joined, text);
}

TEST(HfSplitPattern, OnlyTheKnownRegexesAreRecognised) {
  EXPECT_EQ(recognize_split_pattern(
                R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"),
            SplitPattern::kGpt2);
  EXPECT_EQ(recognize_split_pattern(R"(\w+)"), std::nullopt);
}

// ---- NFC ------------------------------------------------------------------------------

TEST(HfNfc, ComposesReordersAndMapsSingletonsAsUnicodeSays) {
  EXPECT_EQ(to_nfc("caf" "e\xCC\x81"), "caf\xC3\xA9");                    // e + U+0301 -> é
  EXPECT_EQ(to_nfc("\xE2\x84\xAB"), "\xC3\x85");                          // Å sign -> Å
  EXPECT_EQ(to_nfc("a\xCC\xA3\xCC\x82"), "\xE1\xBA\xAD");                 // a + dot + ^ -> ậ
  EXPECT_EQ(to_nfc("a\xCC\x82\xCC\xA3"), "\xE1\xBA\xAD");                 // either order
  EXPECT_EQ(to_nfc("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // jamo -> 각
  EXPECT_EQ(to_nfc("\xE0\xA4\x95\xE0\xA4\xBC"), "\xE0\xA4\x95\xE0\xA4\xBC");  // excluded: stays
  EXPECT_EQ(to_nfc("\xCC\x81x\xCC\x81\xCC\x81"), "\xCC\x81x\xCC\x81\xCC\x81");  // nothing composes
}

TEST(HfNfc, LeavesNfcTextAndInvalidBytesAlone) {
  EXPECT_EQ(to_nfc("plain ASCII, caf\xC3\xA9, \xE6\x97\xA5\xE6\x9C\xAC"), "plain ASCII, caf\xC3\xA9, \xE6\x97\xA5\xE6\x9C\xAC");
  EXPECT_EQ(to_nfc("\xFF e\xCC\x81\x80"), "\xFF \xC3\xA9\x80");
}

// ---- BPE model ------------------------------------------------------------------------

TEST(HfBpe, TheLowestRankedPairMergesFirst) {
  TempDir a("rank_a");
  TempDir b("rank_b");
  EXPECT_EQ(load(a, byte_level_json({{"b", "c"}, {"a", "b"}})).encode("abc"), (Ids{'a', 256}));
  EXPECT_EQ(load(b, byte_level_json({{"a", "b"}, {"b", "c"}})).encode("abc"), (Ids{256, 'c'}));
}

TEST(HfBpe, EqualRanksMergeLeftmostFirstInShortAndLongPieces) {
  TempDir dir;
  const HfTokenizer tok = load(dir, byte_level_json({{"a", "a"}, {"aa", "aa"}}));
  EXPECT_EQ(tok.encode("aaa"), (Ids{256, 'a'}));
  // 101 letters: one piece longer than the array merge handles, so the heap merge runs.
  Ids expected(25, 257);
  expected.push_back('a');
  EXPECT_EQ(tok.encode(std::string(101, 'a')), expected);
  expected.assign(10, 257);
  expected.push_back('a');
  EXPECT_EQ(tok.encode(std::string(41, 'a')), expected);
}

TEST(HfBpe, IgnoreMergesEmitsAWholeTokenPieceAsIs) {
  TempDir dir;
  json j = byte_level_json({{"a", "b"}}, json::array(), /*ignore_merges=*/true);
  j["model"]["vocab"]["abc"] = 300;
  EXPECT_EQ(load(dir, j).encode("abc abd"), (Ids{300, ' ', 256, 'd'}));
  j["model"]["ignore_merges"] = false;
  TempDir dir2("ignore_off");
  EXPECT_EQ(load(dir2, j).encode("abc"), (Ids{256, 'c'}));
}

TEST(HfBpe, ByteLevelRoundTripsAnyBytesIncludingInvalidUtf8) {
  TempDir dir;
  const HfTokenizer tok = load(dir, byte_level_json({{"a", "b"}, {" ", "ab"}}));
  const std::string text = "ab \xFF\xFE ab\x80 caf\xC3\xA9 \xF0\x9F\x98\x80\n";
  const Ids ids = tok.encode(text);
  EXPECT_EQ(tok.decode(ids), text);
  std::string pieces;
  for (const int32_t id : ids) pieces += tok.token_to_piece(id);
  EXPECT_EQ(pieces, text);
}

TEST(HfBpe, SentencePieceBytesFallBackForUnknownCharacters) {
  TempDir dir;
  const HfTokenizer tok = load(dir, sentencepiece_json(/*byte_fallback=*/true, /*fuse_unk=*/true));
  const Ids ids = tok.encode("ab \xC3\xA9");  // "ab é"
  EXPECT_EQ(ids, (Ids{264, 259, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(tok.decode(ids), "ab \xC3\xA9");
  // Pieces keep the leading space that decode() strips from the sequence.
  EXPECT_EQ(tok.token_to_piece(264), " ab");
  EXPECT_EQ(tok.token_to_piece(3 + 0xC3), "\xC3");
}

TEST(HfBpe, UnknownCharactersBecomeUnkFusedOrNotOrAreDropped) {
  TempDir a("unk_fused");
  TempDir b("unk_unfused");
  TempDir c("unk_none");
  EXPECT_EQ(load(a, sentencepiece_json(false, true)).encode("\xC3\xA9\xC3\xA9 a"), (Ids{259, 0, 262}));
  EXPECT_EQ(load(b, sentencepiece_json(false, false)).encode("\xC3\xA9\xC3\xA9 a"), (Ids{259, 0, 0, 262}));
  EXPECT_EQ(load(c, sentencepiece_json(false, false, /*with_unk=*/false)).encode("\xC3\xA9\xC3\xA9 a"),
            (Ids{259, 262}));
}

// ---- added tokens ---------------------------------------------------------------------

json with_added_tokens() {
  return byte_level_json({}, {added_token(300, "<mask>", true, {{"lstrip", true}}),
                              added_token(301, "[X]", false, {{"single_word", true}}),
                              added_token(302, "<m", true),
                              added_token(303, "<r>", true, {{"rstrip", true}})});
}

TEST(HfAddedTokens, LongestMatchWinsAndTheRestIsEncodedNormally) {
  TempDir dir;
  const HfTokenizer tok = load(dir, with_added_tokens());
  EXPECT_EQ(tok.encode("<mask>"), (Ids{300}));
  EXPECT_EQ(tok.encode("<mas"), (Ids{302, 'a', 's'}));
  EXPECT_EQ(tok.vocab_size(), 304);
}

TEST(HfAddedTokens, LstripAndRstripSwallowTheAdjacentWhitespace) {
  TempDir dir;
  const HfTokenizer tok = load(dir, with_added_tokens());
  EXPECT_EQ(tok.encode("a  <mask> b"), (Ids{'a', 300, ' ', 'b'}));
  EXPECT_EQ(tok.encode("x<r> \n y"), (Ids{'x', 303, 'y'}));
}

TEST(HfAddedTokens, SingleWordTokensMatchOnlyBetweenNonWordCharacters) {
  TempDir dir;
  const HfTokenizer tok = load(dir, with_added_tokens());
  EXPECT_EQ(tok.encode("a [X] b"), (Ids{'a', ' ', 301, ' ', 'b'}));
  EXPECT_EQ(tok.encode("a[X]b"), (Ids{'a', '[', 'X', ']', 'b'}));
}

TEST(HfAddedTokens, DecodeSkipsSpecialTokensButKeepsOthers) {
  TempDir dir;
  const HfTokenizer tok = load(dir, with_added_tokens());
  EXPECT_EQ(tok.decode(Ids{'a', 300, 301, 'b'}), "a[X]b");
  EXPECT_TRUE(tok.is_special(300));
  EXPECT_FALSE(tok.is_special(301));
  EXPECT_EQ(tok.token_to_piece(300), "");
  EXPECT_EQ(tok.token_to_piece(301), "[X]");
  EXPECT_THROW(tok.decode(Ids{304}), Error);
  EXPECT_THROW(tok.token_to_piece(-1), Error);
}

TEST(HfAddedTokens, NormalizedTokensAreMatchedAfterTheNormalizer) {
  TempDir dir;
  json j = sentencepiece_json(true, true);
  j["added_tokens"].push_back(added_token(265, "ab", false, {{"normalized", true}}));
  const HfTokenizer tok = load(dir, j);
  // The token's pattern is its normalized form "▁ab": it matches only after a space.
  EXPECT_EQ(tok.encode("ab xab"), (Ids{265, 259, 3 + 'x', 263}));
}

// ---- BOS / EOS / fingerprint / files -----------------------------------------------------

TEST(HfTokenizerSettings, Llama3TakesBosEosFromTheConfig) {
  const fs::path dir = hf_test::trained_tokenizers() / "byte_llama3";
  ASSERT_FALSE(dir.empty());
  const auto tok = load_hf_tokenizer(dir);
  const auto& hf = dynamic_cast<const HfTokenizer&>(*tok);
  EXPECT_EQ(tok->bos_id(), hf.token_to_id("<|begin_of_text|>"));
  EXPECT_EQ(tok->eos_id(), hf.token_to_id("<|eot_id|>"));
  EXPECT_EQ(tok->pad_id(), -1);
  EXPECT_TRUE(hf.add_bos_token());  // from the post_processor template
  EXPECT_FALSE(hf.add_eos_token());
  EXPECT_EQ(tok->name(), "hf-bpe-byte-level");
  // Without the config, the template gives the BOS and a well-known name the EOS.
  const HfTokenizer bare(dir / "tokenizer.json");
  EXPECT_EQ(bare.bos_id(), hf.token_to_id("<|begin_of_text|>"));
  EXPECT_EQ(bare.eos_id(), hf.token_to_id("<|end_of_text|>"));
  EXPECT_NE(bare.fingerprint(), tok->fingerprint());
}

TEST(HfTokenizerSettings, Qwen2HasNoBosAndAPadToken) {
  const fs::path dir = hf_test::trained_tokenizers() / "byte_qwen2";
  ASSERT_FALSE(dir.empty());
  const auto tok = load_hf_tokenizer(dir);
  const auto& hf = dynamic_cast<const HfTokenizer&>(*tok);
  EXPECT_EQ(tok->bos_id(), -1);
  EXPECT_EQ(tok->eos_id(), hf.token_to_id("<|im_end|>"));
  EXPECT_EQ(tok->pad_id(), hf.token_to_id("<|endoftext|>"));
  EXPECT_FALSE(hf.add_bos_token());
}

TEST(HfTokenizerSettings, Llama2ConfigTokensMayBeObjects) {
  const fs::path dir = hf_test::trained_tokenizers() / "sp_llama2";
  ASSERT_FALSE(dir.empty());
  const auto tok = load_hf_tokenizer(dir);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_TRUE(dynamic_cast<const HfTokenizer&>(*tok).add_bos_token());
  EXPECT_EQ(tok->name(), "hf-bpe-sentencepiece");
  EXPECT_TRUE(tok->is_special(0));
}

TEST(HfTokenizerSettings, Gpt2WithoutConfigUsesEndOfTextForBoth) {
  const fs::path dir = hf_test::trained_tokenizers() / "byte_gpt2";
  ASSERT_FALSE(dir.empty());
  const auto tok = load_hf_tokenizer(dir);
  EXPECT_EQ(tok->bos_id(), tok->eos_id());
  EXPECT_EQ(dynamic_cast<const HfTokenizer&>(*tok).id_to_token(tok->eos_id()), "<|endoftext|>");
  EXPECT_FALSE(dynamic_cast<const HfTokenizer&>(*tok).add_bos_token());
}

TEST(HfTokenizerSettings, SaveWritesFilesThatLoadBackToTheSameTokenizer) {
  const fs::path dir = hf_test::trained_tokenizers() / "sp_llama2";
  ASSERT_FALSE(dir.empty());
  const auto tok = load_hf_tokenizer(dir);
  TempDir out;
  tok->save(out.path());
  EXPECT_TRUE(fs::exists(out / "tokenizer_config.json"));
  const auto again = load_hf_tokenizer(out.path());
  EXPECT_EQ(again->fingerprint(), tok->fingerprint());
  EXPECT_EQ(again->encode("Ahoy, matey!"), tok->encode("Ahoy, matey!"));
  EXPECT_EQ(tok->fingerprint().size(), 3u + 16u);
}

TEST(HfTokenizerSettings, ConfigNamingAnUnknownTokenIsAnError) {
  TempDir dir;
  const json config = {{"bos_token", "<nope>"}};
  try {
    load(dir, sentencepiece_json(true, true), &config);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer_config.json: bos_token \"<nope>\" is not a token"),
              std::string::npos) << e.what();
  }
}

TEST(HfTokenizerThreads, ConcurrentEncodesAgreeWithASerialOne) {
  const fs::path dir = hf_test::trained_tokenizers() / "byte_llama3";
  ASSERT_FALSE(dir.empty());
  const auto tok = load_hf_tokenizer(dir);
  const std::string corpus = hf_test::read_file(hf_test::source_dir() / "data/sample/corpus.txt").substr(0, 100000);
  std::vector<std::string> parts;
  for (size_t i = 0; i < corpus.size(); i += 25000) parts.push_back(corpus.substr(i, 25000));
  std::vector<Ids> serial;
  for (const std::string& p : parts) serial.push_back(tok->encode(p));
  std::vector<Ids> parallel(parts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < parts.size(); ++i) {
    threads.emplace_back([&, i] { parallel[i] = tok->encode(parts[i]); });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(parallel, serial);
}

// ---- errors ---------------------------------------------------------------------------

TEST(HfTokenizerErrors, OtherModelTypesAreRefusedByName) {
  for (const char* type : {"WordPiece", "Unigram", "WordLevel"}) {
    TempDir dir(std::string("model_") + type);
    json j = byte_level_json({});
    j["model"]["type"] = type;
    const std::string error = load_error(dir, j.dump());
    EXPECT_NE(error.find((dir / "tokenizer.json").string() + ": tokenizer model type '" + type +
                         "' is not supported (BPE only)"),
              std::string::npos) << error;
  }
}

TEST(HfTokenizerErrors, MalformedJsonNamesTheFile) {
  TempDir dir;
  const std::string error = load_error(dir, "{\"model\": {\"type\": \"BPE\", ");
  EXPECT_NE(error.find((dir / "tokenizer.json").string() + ": not valid JSON"), std::string::npos) << error;
}

TEST(HfTokenizerErrors, AnUnknownSplitRegexIsNamed) {
  TempDir dir;
  json j = byte_level_json({});
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "\\w+|\\s"}}}, {"behavior", "Isolated"}, {"invert", false}};
  const std::string error = load_error(dir, j.dump());
  EXPECT_NE(error.find("split regex \"\\\\w+|\\\\s\" is not supported"), std::string::npos) << error;
}

TEST(HfTokenizerErrors, UnsupportedComponentsAreNamed) {
  TempDir dir;
  json j = byte_level_json({});
  j["normalizer"] = {{"type", "NFKC"}};
  EXPECT_NE(load_error(dir, j.dump()).find("normalizer type 'NFKC' is not supported"), std::string::npos);
  j["normalizer"] = nullptr;
  j["decoder"] = {{"type", "WordPiece"}};
  EXPECT_NE(load_error(dir, j.dump()).find("decoder type 'WordPiece' is not supported"), std::string::npos);
}

TEST(HfTokenizerErrors, BrokenVocabulariesAndMergesAreRefused) {
  TempDir dir;
  json j = byte_level_json({});
  j["model"]["merges"] = {"a zz"};
  EXPECT_NE(load_error(dir, j.dump()).find("merge 0 uses a token that is not in the vocabulary"),
            std::string::npos);
  j = byte_level_json({});
  j["model"]["vocab"]["big"] = 1LL << 40;
  EXPECT_NE(load_error(dir, j.dump()).find("is not an integer in [0,"), std::string::npos);
  j = byte_level_json({});
  j["model"]["vocab"] = json::array();
  EXPECT_NE(load_error(dir, j.dump()).find("model.vocab must be an object"), std::string::npos);
  j = byte_level_json({});
  j["added_tokens"] = {{{"content", 5}, {"id", 1}}};
  EXPECT_NE(load_error(dir, j.dump()).find("added_tokens[0].content must be a string"), std::string::npos);
}

TEST(HfTokenizerErrors, AMissingTokenizerJsonIsNamed) {
  TempDir dir;
  try {
    load_hf_tokenizer(dir.path());
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json: no such file"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flotilla::text
