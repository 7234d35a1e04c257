// Chat templates: exact renders per family, detection from real tokenizer_config.json
// chat_template strings, and resolution from a model directory.
#include "flotilla/data/chat_template.hpp"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "data_test_util.hpp"

namespace flotilla::data {
namespace {

namespace fs = std::filesystem;
using test_util::input_error;
using test_util::TempDir;
using ::testing::HasSubstr;

// The Jinja strings as tokenizer_config.json holds them, written with C++ escapes that
// mirror the JSON ones ("\n" a newline, "\\n" the two characters a Jinja literal decodes).

// meta-llama/Llama-2-7b-chat-hf
constexpr const char* kLlama2Jinja =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif "
    "%}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

// meta-llama/Meta-Llama-3-8B-Instruct
constexpr const char* kLlama3Jinja =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

// meta-llama/Llama-3.1-8B-Instruct (the parts that decide the render; tool branches cut)
constexpr const char* kLlama31Jinja =
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n{%- endfor %}\n";

// mistralai/Mistral-7B-Instruct-v0.3 (the tool-call branches shortened to their markers)
constexpr const char* kMistralV03Jinja =
    "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n"
    "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n"
    "    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is defined "
    "and message.tool_calls is not none)) %}\n"
    "        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n"
    "            {{- raise_exception(\"After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- \"[AVAILABLE_TOOLS] [\" }}\n            {{- \"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    "        {{- \"[TOOL_CALLS] [\" }}\n    {%- elif message[\"role\"] == \"assistant\" %}\n"
    "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n    {%- else %}\n"
    "        {{- raise_exception(\"Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n";

// mistralai/Mixtral-8x7B-Instruct-v0.1 (v0.1/v0.2 style: "[INST] U [/INST]A</s>")
constexpr const char* kMistralV01Jinja =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}";

// Qwen/Qwen2-7B-Instruct
constexpr const char* kQwen2Jinja =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|im_start|>assistant\n' }}{% endif %}";

// teknium/OpenHermes-2.5-Mistral-7B: plain ChatML, no default system message
constexpr const char* kChatmlJinja =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// google/gemma-7b-it: none of the four families
constexpr const char* kGemmaJinja =
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}";

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
  EXPECT_THAT(input_error([] { detect_chat_template(kMistralV01Jinja); }), HasSubstr("--chat-template mistral"));
}

TEST(ChatTemplate, ResolvesFromTokenizerConfigAndOverride) {
  TempDir dir;
  const nlohmann::json config = {{"bos_token", "<s>"}, {"chat_template", kLlama2Jinja}};
  dir.file("tokenizer_config.json", config.dump());
  EXPECT_EQ(resolve_chat_template(dir.path(), "")->family, ChatFamily::llama2);
  EXPECT_EQ(resolve_chat_template(dir.path(), "chatml")->family, ChatFamily::chatml);
  EXPECT_THAT(input_error([&] { resolve_chat_template(dir.path(), "vicuna"); }),
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
  EXPECT_THAT(input_error([&] { resolve_chat_template(dir.path(), ""); }),
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
