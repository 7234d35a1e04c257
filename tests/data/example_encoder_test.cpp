// Records -> tokens and loss masks, with the byte tokenizer so every id is a byte (or
// BOS/EOS) and the expected mask can be read off the text.
#include "flotilla/data/example_encoder.hpp"

#include <gtest/gtest.h>

#include "data_test_util.hpp"
#include "flotilla/text/byte_tokenizer.hpp"

namespace flotilla::data {
namespace {

using test_util::chatml;
using test_util::kBos;
using test_util::kBytes;
using test_util::kEos;

std::vector<int32_t> bytes(std::string_view s) { return {s.begin(), s.end()}; }

std::vector<int32_t> concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// n copies of `v`.
std::vector<uint8_t> ones(size_t n, uint8_t v = 1) { return std::vector<uint8_t>(n, v); }
std::vector<uint8_t> concat(std::initializer_list<std::vector<uint8_t>> parts) {
  std::vector<uint8_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

TEST(ExampleEncoder, TextIsBosTextEosAllInTheLoss) {
  const ExampleEncoder enc(kBytes, std::nullopt, {.mask_prompt = true});
  const EncodedExample e = enc.encode(TextRecord{"Arr"});
  EXPECT_EQ(e.tokens, concat({{kBos}, bytes("Arr"), {kEos}}));
  EXPECT_EQ(e.mask, concat({{0}, ones(4)}));
  EXPECT_FALSE(e.truncated());
}

TEST(ExampleEncoder, CompletionWithoutTemplateMasksExactlyThePrompt) {
  const ExampleEncoder enc(kBytes, std::nullopt, {.mask_prompt = true});
  const EncodedExample e = enc.encode(CompletionRecord{"Q: hi\nA:", " ahoy"});
  EXPECT_EQ(e.tokens, concat({{kBos}, bytes("Q: hi\nA:"), bytes(" ahoy"), {kEos}}));
  EXPECT_EQ(e.mask, concat({ones(1 + 8, 0), ones(5 + 1)}));
  EXPECT_EQ(e.trainable_targets(), 6u);
}

TEST(ExampleEncoder, WithoutMaskPromptEveryTokenIsInTheLoss) {
  const ExampleEncoder enc(kBytes, chatml(), {.mask_prompt = false});
  const EncodedExample e = enc.encode(CompletionRecord{"hi", "yo"});
  EXPECT_EQ(e.mask, ones(e.tokens.size()));
}

TEST(ExampleEncoder, CompletionGoesThroughTheChatTemplateAsOneUserTurn) {
  const ExampleEncoder enc(kBytes, chatml(), {.mask_prompt = true});
  const EncodedExample e = enc.encode(CompletionRecord{"hi", "yo"});
  const std::string prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
  const std::string answer = "yo<|im_end|>";
  EXPECT_EQ(e.tokens, bytes(prompt + answer + "\n"));
  EXPECT_EQ(e.mask, concat({ones(prompt.size(), 0), ones(answer.size()), {0}}));
}

TEST(ExampleEncoder, ChatMasksEverythingButTheAssistantTurns) {
  const ExampleEncoder enc(kBytes, chatml(), {.mask_prompt = true});
  const EncodedExample e = enc.encode(ChatRecord{{{Role::system, "S"},
                                                  {Role::user, "U1"},
                                                  {Role::assistant, "A1"},
                                                  {Role::user, "U2"},
                                                  {Role::assistant, "A2"}}});
  const std::string text =
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
      "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n";
  ASSERT_EQ(e.tokens, bytes(text));
  std::vector<uint8_t> expected(text.size(), 0);
  for (const std::string answer : {"A1<|im_end|>", "A2<|im_end|>"}) {
    const size_t at = text.find(answer);
    std::fill_n(expected.begin() + static_cast<ptrdiff_t>(at), answer.size(), 1);
  }
  EXPECT_EQ(e.mask, expected);
}

TEST(ExampleEncoder, ChatWithoutTemplateIsAnInputErrorSayingSo) {
  const ExampleEncoder enc(kBytes, std::nullopt, {});
  try {
    enc.encode(ChatRecord{{{Role::user, "hi"}}});
    FAIL() << "expected InputError";
  } catch (const ConversationError&) {
    FAIL() << "a missing template is not the conversation's fault";
  } catch (const InputError& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("needs a chat template"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("--chat-template"));
  }
}

TEST(ExampleEncoder, TruncatesAtMaxSeqLenAndRemembersTheLength) {
  const ExampleEncoder enc(kBytes, std::nullopt, {.mask_prompt = false, .max_seq_len = 4});
  const EncodedExample e = enc.encode(TextRecord{"abcdef"});
  EXPECT_EQ(e.tokens, concat({{kBos}, bytes("abc")}));
  EXPECT_EQ(e.mask.size(), 4u);
  EXPECT_EQ(e.length_before_truncation, 8u);
  EXPECT_TRUE(e.truncated());
}

// A tokenizer that merges "ab" into one token, so encoding pieces separately differs from
// encoding the whole: ids are bytes, 300 is "ab".
class MergingTokenizer final : public text::Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view s) const override {
    std::vector<int32_t> out;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s.substr(i, 2) == "ab") {
        out.push_back(300);
        ++i;
      } else {
        out.push_back(static_cast<unsigned char>(s[i]));
      }
    }
    return out;
  }
  std::string decode(std::span<const int32_t>) const override { return {}; }
  int32_t vocab_size() const override { return 301; }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return -1; }
  bool is_special(int32_t) const override { return false; }
  std::string token_to_piece(int32_t) const override { return {}; }
  std::string name() const override { return "merging"; }
  std::string fingerprint() const override { return "merging-v1"; }
  void save(const std::filesystem::path&) const override {}
};

TEST(ExampleEncoder, TokensComeFromTheWholeTextWhenAMergeSpansASegmentBoundary) {
  const MergingTokenizer tok;
  const ExampleEncoder enc(tok, std::nullopt, {.mask_prompt = true});
  // Prompt "xa", completion "by": the whole text "xaby" encodes as x, ab, y.
  const EncodedExample e = enc.encode(CompletionRecord{"xa", "by"});
  EXPECT_EQ(e.tokens, (std::vector<int32_t>{'x', 300, 'y'}));
  // The prompt "xa" encodes to 2 tokens: the boundary falls after the merged token.
  EXPECT_EQ(e.mask, (std::vector<uint8_t>{0, 0, 1}));
}

TEST(ExampleEncoder, TokenizerWithoutBosOrEosAddsNone) {
  const MergingTokenizer tok;
  const ExampleEncoder enc(tok, std::nullopt, {});
  EXPECT_EQ(enc.encode(TextRecord{"xy"}).tokens, (std::vector<int32_t>{'x', 'y'}));
}

}  // namespace
}  // namespace flotilla::data
