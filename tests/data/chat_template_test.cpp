// Chat templates: exact renders per family, detection from real tokenizer_config.json
// chat_template strings, and resolution from a model directory.
#include "flotilla/data/chat_template.hpp"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "data_test_util.hpp"
#include "real_chat_templates.hpp"

namespace flotilla::data {
namespace {

namespace fs = std::filesystem;
using test_util::input_error_of;
using test_util::TempDir;
using namespace test_util;  // the real templates (real_chat_templates.hpp)
using ::testing::HasSubstr;

ChatTemplate family(ChatFamily f) {
  ChatTemplate t;
  t.family = f;
  return t;
}

// Three user/assistant turns after a system prompt; one answer padded with spaces to show
// which templates trim.
const std::vector<Message> kConversation = {
    {Role::system, "Talk like a pirate."},
    {Role::user, "Hello"},
    {Role::assistant, "Ahoy, matey!"},
    {Role::user, "Where is the treasure?"},
    {Role::assistant, "  Buried on the isle.  "},
    {Role::user, "Thanks"},
    {Role::assistant, "Arr."},
};

std::string render(const ChatTemplate& t, const std::vector<Message>& messages) {
  return segments_text(render_chat(t, messages));
}

// The text of the trainable segments, joined with "|".
std::string trainable_text(const std::vector<Segment>& segments) {
  std::string out;
  for (const Segment& s : segments) {
    if (s.trainable) out += (out.empty() ? "" : "|") + s.text;
  }
  return out;
}

TEST(ChatTemplate, Llama3RendersExactly) {
  EXPECT_EQ(render(family(ChatFamily::llama3), kConversation),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nTalk like a pirate.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nAhoy, matey!<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhere is the treasure?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nBuried on the isle.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nThanks<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nArr.<|eot_id|>");
  EXPECT_EQ(trainable_text(render_chat(family(ChatFamily::llama3), kConversation)),
            "Ahoy, matey!<|eot_id|>|Buried on the isle.<|eot_id|>|Arr.<|eot_id|>");
}

TEST(ChatTemplate, ChatmlRendersExactly) {
  EXPECT_EQ(render(family(ChatFamily::chatml), kConversation),
            "<|im_start|>system\nTalk like a pirate.<|im_end|>\n"
            "<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\nAhoy, matey!<|im_end|>\n"
            "<|im_start|>user\nWhere is the treasure?<|im_end|>\n"
            "<|im_start|>assistant\n  Buried on the isle.  <|im_end|>\n"
            "<|im_start|>user\nThanks<|im_end|>\n"
            "<|im_start|>assistant\nArr.<|im_end|>\n");
  EXPECT_EQ(trainable_text(render_chat(family(ChatFamily::chatml), kConversation)),
            "Ahoy, matey!<|im_end|>|  Buried on the isle.  <|im_end|>|Arr.<|im_end|>");
}

TEST(ChatTemplate, Llama2RendersExactly) {
  EXPECT_EQ(render(family(ChatFamily::llama2), kConversation),
            "<s>[INST] <<SYS>>\nTalk like a pirate.\n<</SYS>>\n\nHello [/INST] Ahoy, matey! </s>"
            "<s>[INST] Where is the treasure? [/INST] Buried on the isle. </s>"
            "<s>[INST] Thanks [/INST] Arr. </s>");
  EXPECT_EQ(trainable_text(render_chat(family(ChatFamily::llama2), kConversation)),
            " Ahoy, matey! </s>| Buried on the isle. </s>| Arr. </s>");
}

TEST(ChatTemplate, MistralRendersExactlyWithSystemBeforeTheLastUserMessage) {
  EXPECT_EQ(render(family(ChatFamily::mistral), kConversation),
            "<s>[INST] Hello[/INST] Ahoy, matey!</s>"
            "[INST] Where is the treasure?[/INST] Buried on the isle.</s>"
            "[INST] Talk like a pirate.\n\nThanks[/INST] Arr.</s>");
  EXPECT_EQ(trainable_text(render_chat(family(ChatFamily::mistral), kConversation)),
            " Ahoy, matey!</s>| Buried on the isle.</s>| Arr.</s>");
}

// Hugging Face renders of the conversation in llama.cpp's tests/test-chat-template.cpp
// (system, user, assistant, user, assistant "   I am an assistant   ", user): our render is
// theirs without the generation prompt and with the BOS text they leave out.
TEST(ChatTemplate, MatchesPublishedHuggingFaceRenders) {
  const std::vector<Message> conversation = {
      {Role::system, "You are a helpful assistant"}, {Role::user, "Hello"},
      {Role::assistant, "Hi there"},                 {Role::user, "Who are you"},
      {Role::assistant, "   I am an assistant   "},  {Role::user, "Another question"},
  };
  EXPECT_EQ(render(family(ChatFamily::llama2), conversation),
            "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s><s>[INST] Who "
            "are you [/INST] I am an assistant </s><s>[INST] Another question [/INST]");
  EXPECT_EQ(render(family(ChatFamily::mistral), conversation),
            "<s>[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>[INST] You are a "
            "helpful assistant\n\nAnother question[/INST]");
  EXPECT_EQ(render(family(ChatFamily::llama3), conversation),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
            "\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nAnother question<|eot_id|>");
  EXPECT_EQ(render(family(ChatFamily::chatml), conversation),
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
            "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n");
}

TEST(ChatTemplate, WithoutSystemMessage) {
  const std::vector<Message> turn = {{Role::user, "Hi"}, {Role::assistant, "Ahoy"}};
  EXPECT_EQ(render(family(ChatFamily::llama2), turn), "<s>[INST] Hi [/INST] Ahoy </s>");
  EXPECT_EQ(render(family(ChatFamily::mistral), turn), "<s>[INST] Hi[/INST] Ahoy</s>");
  EXPECT_EQ(render(family(ChatFamily::chatml), turn),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nAhoy<|im_end|>\n");
}

TEST(ChatTemplate, Qwen2DefaultSystemIsInsertedWhenMissing) {
  const auto t = detect_chat_template(kQwen2Jinja);
  ASSERT_TRUE(t);
  const std::vector<Message> turn = {{Role::user, "Hi"}, {Role::assistant, "Ahoy"}};
  EXPECT_EQ(render(*t, turn),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nAhoy<|im_end|>\n");
  const std::vector<Message> with_system = {{Role::system, "Be brief."}, {Role::user, "Hi"}};
  EXPECT_EQ(render(*t, with_system), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

TEST(ChatTemplate, Llama31AlwaysWritesTheDatedSystemTurn) {
  const auto t = detect_chat_template(kLlama31Jinja);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->family, ChatFamily::llama3);
  const std::vector<Message> turn = {{Role::user, "Hi"}, {Role::assistant, "Ahoy"}};
  EXPECT_EQ(render(*t, turn),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nAhoy<|eot_id|>");
  const std::vector<Message> with_system = {{Role::system, " Be a pirate. "}, {Role::user, "Hi"}};
  EXPECT_EQ(render(*t, with_system),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            "Today Date: 26 Jul 2024\n\nBe a pirate.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
}

TEST(ChatTemplate, Llama2AndMistralRefuseRolesOutOfOrder) {
  const std::vector<Message> two_users = {{Role::user, "a"}, {Role::user, "b"}};
  const std::vector<Message> assistant_first = {{Role::assistant, "a"}, {Role::user, "b"}};
  const std::vector<Message> late_system = {{Role::user, "a"}, {Role::assistant, "b"}, {Role::system, "c"}};
  for (ChatFamily f : {ChatFamily::llama2, ChatFamily::mistral}) {
    EXPECT_THROW(render_chat(family(f), two_users), ConversationError);
    EXPECT_THROW(render_chat(family(f), assistant_first), ConversationError);
    EXPECT_THROW(render_chat(family(f), late_system), ConversationError);
  }
  // llama3 and chatml write any order, as their templates do.
  EXPECT_NO_THROW(render_chat(family(ChatFamily::llama3), two_users));
  EXPECT_NO_THROW(render_chat(family(ChatFamily::chatml), late_system));
}

TEST(ChatTemplate, SystemOnlyConversationIsRefused) {
  const std::vector<Message> only_system = {{Role::system, "x"}};
  EXPECT_THROW(render_chat(family(ChatFamily::chatml), only_system), ConversationError);
}

TEST(ChatTemplate, DetectsFamiliesFromRealTemplates) {
  EXPECT_EQ(detect_chat_template(kLlama2Jinja)->family, ChatFamily::llama2);
  EXPECT_EQ(detect_chat_template(kLlama3Jinja)->family, ChatFamily::llama3);
  EXPECT_FALSE(detect_chat_template(kLlama3Jinja)->default_system);
  EXPECT_EQ(detect_chat_template(kMistralV03Jinja)->family, ChatFamily::mistral);
  EXPECT_EQ(detect_chat_template(kQwen2Jinja)->family, ChatFamily::chatml);
  EXPECT_EQ(detect_chat_template(kQwen2Jinja)->default_system, "You are a helpful assistant.");
  EXPECT_EQ(detect_chat_template(kChatmlJinja)->family, ChatFamily::chatml);
  EXPECT_FALSE(detect_chat_template(kChatmlJinja)->default_system);
  EXPECT_FALSE(detect_chat_template(kGemmaJinja));
  EXPECT_FALSE(detect_chat_template(""));
}

TEST(ChatTemplate, MistralV01TemplateIsRefusedWithAHint) {
  EXPECT_THAT(input_error_of([] { detect_chat_template(kMistralV01Jinja); }), HasSubstr("--chat-template mistral"));
}

TEST(ChatTemplate, ResolvesFromTokenizerConfigAndOverride) {
  TempDir dir;
  const nlohmann::json config = {{"bos_token", "<s>"}, {"chat_template", kLlama2Jinja}};
  dir.file("tokenizer_config.json", config.dump());
  EXPECT_EQ(resolve_chat_template(dir.path(), "")->family, ChatFamily::llama2);
  EXPECT_EQ(resolve_chat_template(dir.path(), "chatml")->family, ChatFamily::chatml);
  EXPECT_THAT(input_error_of([&] { resolve_chat_template(dir.path(), "vicuna"); }),
              HasSubstr("unknown chat template 'vicuna' (known: llama2, llama3, mistral, chatml)"));
}

TEST(ChatTemplate, ResolvesTheDefaultOfATemplateList) {
  TempDir dir;
  const nlohmann::json config = {
      {"chat_template", {{{"name", "tool_use"}, {"template", kLlama2Jinja}}, {{"name", "default"}, {"template", kQwen2Jinja}}}}};
  dir.file("tokenizer_config.json", config.dump());
  const auto t = resolve_chat_template(dir.path(), "");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->family, ChatFamily::chatml);
  EXPECT_EQ(t->default_system, "You are a helpful assistant.");
  // Overriding with the detected family keeps the details.
  EXPECT_EQ(resolve_chat_template(dir.path(), "chatml")->default_system, "You are a helpful assistant.");
}

TEST(ChatTemplate, ResolvesChatTemplateJinjaFile) {
  TempDir dir;
  dir.file("chat_template.jinja", kLlama3Jinja);
  EXPECT_EQ(resolve_chat_template(dir.path(), "")->family, ChatFamily::llama3);
}

TEST(ChatTemplate, NoTemplateAndNoOverrideIsNullopt) {
  TempDir dir;
  dir.file("tokenizer_config.json", "{\"bos_token\": \"<s>\"}");
  EXPECT_FALSE(resolve_chat_template(dir.path(), ""));
  EXPECT_EQ(resolve_chat_template(dir.path(), "llama3")->family, ChatFamily::llama3);
}

TEST(ChatTemplate, UnknownTemplateFamilyNamesTheFile) {
  TempDir dir;
  dir.file("tokenizer_config.json", nlohmann::json({{"chat_template", kGemmaJinja}}).dump());
  EXPECT_THAT(input_error_of([&] { resolve_chat_template(dir.path(), ""); }),
              HasSubstr("tokenizer_config.json: the chat template is none of the families"));
  EXPECT_EQ(resolve_chat_template(dir.path(), "mistral")->family, ChatFamily::mistral);
}

TEST(PythonStrip, StripsUnicodeWhitespaceLikePython) {
  EXPECT_EQ(python_strip("  a b \n\t"), "a b");
  EXPECT_EQ(python_strip("\xC2\xA0x\xE3\x80\x80"), "x");  // U+00A0, U+3000
  EXPECT_EQ(python_strip("\xC3\xA9"), "\xC3\xA9");         // é is not space
  EXPECT_EQ(python_strip(" \x1f "), "");
  EXPECT_EQ(python_strip(""), "");
}

}  // namespace
}  // namespace flotilla::data
