// HfTokenizer against Hugging Face's own implementation (tokenizers.js, npm
// @huggingface/tokenizers 0.2.0, run by Node.js): on each tokenizer that
// tests/text/hf_reference/make_tokenizers.py trains, every text of texts.json, the whole
// sample corpus, and random mixtures of awkward fragments must encode to the same ids and
// decode to the same text.
//
// The npm package is installed into <build>/npm on first use (npm install, registry
// access needed once). Without node the test is skipped; without the package it fails.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "flotilla/text/hf_tokenizer.hpp"
#include "../test_seed.hpp"
#include "hf_test_util.hpp"

namespace flotilla::text {
namespace {

using hf_test::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kPackage = "@huggingface/tokenizers";
constexpr const char* kPackageVersion = "0.2.0";

// <build>/npm with the package in it, installing it when missing; empty path (and a
// failure recorded) when that does not work.
fs::path npm_prefix() {
  const fs::path prefix = hf_test::build_dir() / "npm";
  const fs::path manifest = prefix / "node_modules" / kPackage / "package.json";
  if (!fs::exists(manifest)) {
    if (!hf_test::have_command("npm")) {
      ADD_FAILURE() << "npm not found: cannot install " << kPackage << "@" << kPackageVersion;
      return {};
    }
    // Install beside the final folder and rename, so that test processes running in
    // parallel never see a half-installed package.
    const fs::path staging = hf_test::build_dir() / ("npm.staging." + std::to_string(::getpid()));
    fs::remove_all(staging);
    fs::create_directories(staging);
    const fs::path log = hf_test::build_dir() / ("npm_install." + std::to_string(::getpid()) + ".log");
    const std::string command = fmt::format("npm install --prefix {} --no-audit --no-fund {}@{}",
                                            hf_test::shell_quote(staging.string()), kPackage, kPackageVersion);
    const int rc = hf_test::run_command(command, log);
    std::error_code ec;
    if (rc == 0) fs::rename(staging, prefix, ec);  // fails harmlessly if another process won
    fs::remove_all(staging, ec);
    if (!fs::exists(manifest)) {
      ADD_FAILURE() << "could not install " << kPackage << "@" << kPackageVersion << " (exit " << rc
                    << "): " << command << "\n" << hf_test::read_file(log);
      fs::remove(log, ec);
      return {};
    }
    fs::remove(log, ec);
  }
  const json package = json::parse(hf_test::read_file(manifest), nullptr, false);
  if (!package.is_object() || package.value("version", "") != kPackageVersion) {
    ADD_FAILURE() << manifest << " is not version " << kPackageVersion << "; remove " << prefix;
    return {};
  }
  return prefix;
}

// Random concatenations of fragments that stress the split rules and added tokens.
std::vector<std::string> random_mixtures(uint32_t seed, size_t count) {
  static const std::vector<std::string> fragments = {
      "the", " ship", "Ahoy", "DON'T", "'s", "'ll", "'Re", " ", "  ", "   ", "\n", "\n\n", "\r\n",
      "\t", " \t ", "12345", "7", " 2024", "3.14", "!!", "...", " (", ")", "{", "}", "[", "]", "\"",
      "caf\xC3\xA9", "na\xC3\xAFve", "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E", "\xE4\xBD\xA0\xE5\xA5\xBD",
      "\xF0\x9F\x98\x80", "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", "\xE2\x9A\x93", "\xC3\x85ngstr\xC3\xB6m",
      "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82", "x\xC2\xB2", "\xC2\xBD", "<|eot_id|>",
      "<|begin_of_text|>", "<|endoftext|>", "<s>", "</s>", "[[flotilla]]", "<|im_end|>", "_", "-", "'",
      "\xE2\x96\x81", "a", "B", "0",
  };
  std::mt19937 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, fragments.size() - 1);
  std::uniform_int_distribution<int> length(1, 12);
  std::vector<std::string> texts;
  for (size_t i = 0; i < count; ++i) {
    std::string text;
    for (int k = length(rng); k > 0; --k) text += fragments[pick(rng)];
    texts.push_back(std::move(text));
  }
  return texts;
}

// First index where two id lists differ, for the failure message.
std::string first_difference(const std::vector<int32_t>& ours, const std::vector<int32_t>& theirs) {
  size_t i = 0;
  while (i < ours.size() && i < theirs.size() && ours[i] == theirs[i]) ++i;
  auto around = [&](const std::vector<int32_t>& v) {
    const size_t from = i >= 3 ? i - 3 : 0;
    return fmt::format("[{}]", fmt::join(v.begin() + std::min(from, v.size()),
                                         v.begin() + std::min(i + 4, v.size()), ", "));
  };
  return fmt::format("lengths {} vs {}, first difference at {}: ours {} theirs {}", ours.size(),
                     theirs.size(), i, around(ours), around(theirs));
}

class HfReference : public ::testing::TestWithParam<const char*> {};

TEST_P(HfReference, EncodeAndDecodeMatchHuggingFace) {
  if (!hf_test::have_command("node")) GTEST_SKIP() << "node not found: reference comparison skipped";
  const fs::path trained = hf_test::trained_tokenizers();
  ASSERT_FALSE(trained.empty());
  const fs::path prefix = npm_prefix();
  ASSERT_FALSE(prefix.empty());
  const fs::path dir = trained / GetParam();

  const fs::path reference = hf_test::source_dir() / "tests/text/hf_reference";
  const json fixed = json::parse(hf_test::read_file(reference / "texts.json"));
  std::vector<std::string> texts = fixed.get<std::vector<std::string>>();
  // The whole corpus as one text; 100 KB of it for SentencePiece layouts, where all of it
  // is one piece, which tokenizers.js merges slowly (12 s for the 600 KB).
  const std::string corpus = hf_test::read_file(hf_test::source_dir() / "data/sample/corpus.txt");
  texts.push_back(std::string(GetParam()).starts_with("sp_") ? corpus.substr(0, 100000) : corpus);
  std::string long_word;  // one piece far longer than the array merge handles
  for (int i = 0; i < 150; ++i) long_word += "ab";
  texts.push_back(long_word + "\xC3\xA9" + long_word);
  const auto seed = static_cast<uint32_t>(flotilla::testing::test_seed());
  for (std::string& t : random_mixtures(seed, 300)) {
    // One known divergence, kept out of the comparison. Where a normalizer changes an added
    // token's content (sp_llama2 prepends "\u2581": "[[flotilla]]" is matched in normalized
    // text as "\u2581[[flotilla]]"), tokenizers.js takes any leftover piece that equals a
    // token's raw or normalized content as that token: "[[flotilla]]" right after another
    // match, or a whole section "\u2581[[flotilla]]" (normalized to "\u2581\u2581[[flotilla]]").
    // Rust tokenizers, what transformers runs, encodes such pieces as plain text, and so do
    // we. A space before the token keeps the fragments tested without the quirk.
    for (const std::string before : {"]]", "\xE2\x96\x81"}) {
      for (size_t at = 0; (at = t.find(before + "[[flotilla]]", at)) != std::string::npos;) {
        t.insert(at + before.size(), " ");
      }
    }
    texts.push_back(std::move(t));
  }

  TempDir work(std::string("reference_") + GetParam());
  hf_test::write_file(work / "texts.json", json(texts).dump());
  const std::string command = fmt::format(
      "node {} {} {} {} {}", hf_test::shell_quote((reference / "hf_encode.mjs").string()),
      hf_test::shell_quote(prefix.string()), hf_test::shell_quote(dir.string()),
      hf_test::shell_quote((work / "texts.json").string()), hf_test::shell_quote((work / "out.json").string()));
  ASSERT_EQ(hf_test::run_command(command, work / "node.log"), 0)
      << command << "\n" << hf_test::read_file(work / "node.log");
  const json out = json::parse(hf_test::read_file(work / "out.json"));
  const auto theirs_ids = out.at("ids").get<std::vector<std::vector<int32_t>>>();
  const auto theirs_text = out.at("decoded").get<std::vector<std::string>>();
  ASSERT_EQ(theirs_ids.size(), texts.size());

  const auto tok = load_hf_tokenizer(dir);
  size_t equal = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::vector<int32_t> ids = tok->encode(texts[i]);
    const std::string shown = json(texts[i].substr(0, 200)).dump();
    EXPECT_EQ(ids, theirs_ids[i]) << "text " << i << " " << shown << ": " << first_difference(ids, theirs_ids[i]);
    const std::string decoded = tok->decode(theirs_ids[i]);
    EXPECT_EQ(decoded, theirs_text[i]) << "text " << i << " " << shown;
    equal += ids == theirs_ids[i] && decoded == theirs_text[i];
  }
  std::cout << GetParam() << ": " << equal << " of " << texts.size() << " texts encode and decode as "
            << kPackage << " " << kPackageVersion << " does\n";
}

INSTANTIATE_TEST_SUITE_P(Trained, HfReference,
                         ::testing::Values("byte_llama3", "byte_qwen2", "byte_gpt2", "byte_gpt2_prefix",
                                           "sp_llama2", "sp_metaspace"));

}  // namespace
}  // namespace flotilla::text
