// The Jinja subset that runs tokenizer_config.json chat templates: real templates give what
// the C++ family renderers give and what Python's jinja2 gives (Hugging Face's settings),
// and an unsupported construct is an error that names it.
#include "flotilla/data/jinja.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "data_test_util.hpp"
#include "flotilla/data/chat_prompt.hpp"
#include "real_chat_templates.hpp"

namespace flotilla::data {
namespace {

using namespace test_util;
using ::testing::HasSubstr;

const std::vector<Message> kPirate = {
    {Role::system, "Talk like a pirate."},
    {Role::user, "Hello"},
    {Role::assistant, "  Ahoy, matey!  "},
    {Role::user, "Where is the treasure?"},
};

std::string render_jinja(std::string_view jinja, const std::vector<Message>& messages, bool generation_prompt,
                         const std::string& bos = "<s>", const std::string& eos = "</s>") {
  return ChatPrompter::from_jinja(jinja, bos, eos).render(messages, generation_prompt);
}

std::string render_family(ChatFamily f, const std::vector<Message>& messages, bool generation_prompt) {
  ChatTemplate t;
  t.family = f;
  return ChatPrompter::from_family(t).render(messages, generation_prompt);
}

std::vector<Message> without_system(std::vector<Message> m) {
  m.erase(m.begin());
  return m;
}

TEST(Jinja, RealTemplatesRenderAsTheBuiltInFamilies) {
  for (bool gen : {false, true}) {
    SCOPED_TRACE(gen ? "with generation prompt" : "without");
    EXPECT_EQ(render_jinja(kLlama2Jinja, kPirate, gen), render_family(ChatFamily::llama2, kPirate, gen));
    EXPECT_EQ(render_jinja(kLlama3Jinja, kPirate, gen, "<|begin_of_text|>", "<|eot_id|>"),
              render_family(ChatFamily::llama3, kPirate, gen));
    EXPECT_EQ(render_jinja(kChatmlJinja, kPirate, gen), render_family(ChatFamily::chatml, kPirate, gen));
    EXPECT_EQ(render_jinja(kMistralV03Jinja, kPirate, gen), render_family(ChatFamily::mistral, kPirate, gen));
  }
  ChatTemplate qwen;
  qwen.family = ChatFamily::chatml;
  qwen.default_system = "You are a helpful assistant.";
  const auto no_system = without_system(kPirate);
  EXPECT_EQ(render_jinja(kQwen2Jinja, no_system, true), ChatPrompter::from_family(qwen).render(no_system, true));
}

TEST(Jinja, Llama3PromptEndsWithTheAssistantHeader) {
  EXPECT_EQ(render_jinja(kLlama3Jinja, {{Role::user, " Hi "}}, true, "<|begin_of_text|>"),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(Jinja, ZephyrNewlinesBetweenTagsAreTrimmed) {
  EXPECT_EQ(render_jinja(kZephyrJinja, {{Role::system, "S"}, {Role::user, "U"}}, true),
            "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n");
}

TEST(Jinja, MistralV01RendersItsOwnSpacing) {
  EXPECT_EQ(render_jinja(kMistralV01Jinja, without_system(kPirate), true),
            "<s>[INST] Hello [/INST]  Ahoy, matey!  </s>[INST] Where is the treasure? [/INST]");
}

TEST(Jinja, RaiseExceptionIsAnInputErrorWithTheTemplatesMessage) {
  const std::string e = input_error_of([] { render_jinja(kMistralV01Jinja, kPirate, true); });
  EXPECT_THAT(e, HasSubstr("Conversation roles must alternate user/assistant/user/assistant/..."));
}

TEST(Jinja, UnsupportedConstructsAreNamedWithTheirLine) {
  EXPECT_THAT(input_error_of([] { jinja::Template("hi\n{% macro greet(n) %}x{% endmacro %}"); }),
              AllOf(HasSubstr("line 2"), HasSubstr("{% macro %}"), HasSubstr("not supported")));
  EXPECT_THAT(input_error_of([] { jinja::Template("{{ messages | wordcount }}").render({}); }),
              AllOf(HasSubstr("filter 'wordcount'"), HasSubstr("not supported")));
  EXPECT_THAT(input_error_of([] { jinja::Template("{% call foo() %}{% endcall %}"); }), HasSubstr("{% call %}"));
  EXPECT_THAT(input_error_of([] { jinja::Template("{{ 'a' is divisibleby 3 }}").render({}); }),
              HasSubstr("test 'divisibleby'"));
  EXPECT_THAT(input_error_of([] { jinja::Template("{% if x %}never closed"); }), HasSubstr("{% endif %}' is missing"));
  EXPECT_THAT(input_error_of([] { jinja::Template("{{ 1 + }}"); }), HasSubstr("line 1"));
}

TEST(Jinja, EndOfTurnComesFromTheTemplate) {
  EXPECT_EQ(ChatPrompter::from_jinja(kLlama3Jinja, "<|begin_of_text|>", "<|eot_id|>").end_of_turn(), "<|eot_id|>");
  EXPECT_EQ(ChatPrompter::from_jinja(kQwen2Jinja, "", "<|endoftext|>").end_of_turn(), "<|im_end|>");
  EXPECT_EQ(ChatPrompter::from_jinja(kZephyrJinja, "<s>", "</s>").end_of_turn(), "</s>");
  EXPECT_EQ(ChatPrompter::from_jinja(kLlama2Jinja, "<s>", "</s>").end_of_turn(), "</s>");
}

TEST(ChatPrompter, ModelDirectoryTemplateRunsAndBadOneIsNamed) {
  TempDir dir;
  nlohmann::json config = {{"chat_template", kZephyrJinja}, {"eos_token", {{"content", "</s>"}}}};
  dir.file("good/tokenizer_config.json", config.dump());
  const auto p = ChatPrompter::for_model(dir.path() / "good", "");
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->render(std::vector<Message>{{Role::user, "U"}}, true), "<|user|>\nU</s>\n<|assistant|>\n");
  // A template past the subset but of a known family falls back to the family's renderer.
  config["chat_template"] = std::string("{% macro m() %}{% endmacro %}") + kChatmlJinja;
  dir.file("family/tokenizer_config.json", config.dump());
  EXPECT_EQ(ChatPrompter::for_model(dir.path() / "family", "")->render(std::vector<Message>{{Role::user, "U"}}, true),
            "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
  config["chat_template"] = "{% macro m() %}{% endmacro %}{{ messages }}";
  dir.file("bad/tokenizer_config.json", config.dump());
  EXPECT_THAT(input_error_of([&] { ChatPrompter::for_model(dir.path() / "bad", ""); }),
              AllOf(HasSubstr("tokenizer_config.json"), HasSubstr("{% macro %}")));
  dir.file("none/tokenizer_config.json", "{}");
  EXPECT_FALSE(ChatPrompter::for_model(dir.path() / "none", "").has_value());
}

// Templates exercising the subset's corners, rendered here and by jinja2 with Hugging Face's
// environment (trim_blocks, lstrip_blocks, loop controls, raise_exception).
const char* const kCornerTemplates[] = {
    "{%- for m in messages -%}\n  {{ loop.index }}/{{ loop.length }} {{ m.role | upper }}: {{ m['content'] | trim "
    "}}{% if not loop.last %} | {% endif %}\n{%- endfor %}",
    "{% set ns = namespace(n=0, s='') %}{% for m in messages if m.role != 'system' %}{% set ns.n = ns.n + 1 %}"
    "{% set ns.s = ns.s ~ m.content[:3] %}{% endfor %}{{ ns.n }} {{ ns.s }} {{ messages[-1].content[::-1] }}",
    "  {% if messages[0].role == 'system' %}\n    SYS {{ messages[0].content.split(' ') | join(',') }}\n  {% else "
    "%}\n    none\n  {% endif %}\n{# a comment #}\nend {{ 7 // 2 }} {{ -7 % 3 }} {{ 'x' * 3 }}",
    "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content.startswith('Hel') "
    "}}{{ m.content | length }} {% endfor %}{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"
    "{{ messages[0] | tojson }}{{ undefined_thing is defined }}{{ undefined_thing | default('dflt') }}",
    "{% for k, v in {'a': 1, 'b': [1, 'x']}.items() %}{{ k }}={{ v }};{% endfor %}{{ 'b' in 'abc' }}"
    "{{ 3 not in [1, 2] }}{{ none is none }}{{ 'Ab cD'.title() }}{{ '  x '.rstrip() }}|{{ 'yes' if 1 > 2 else 'no' }}",
};

TEST(Jinja, MatchesPythonJinja2) {
  if (std::system("/usr/bin/python3 -c 'import jinja2' 2>/dev/null") != 0)
    FAIL() << "Python's jinja2 is not installed (Debian: python3-jinja2; scripts/setup installs it)";
  TempDir dir;
  nlohmann::ordered_json cases = nlohmann::ordered_json::array();  // role before content, as we hold it
  std::vector<std::string> ours;
  std::vector<const char*> templates(std::begin(kCornerTemplates), std::end(kCornerTemplates));
  for (const char* t : {kLlama2Jinja, kLlama3Jinja, kLlama31Jinja, kMistralV03Jinja, kQwen2Jinja, kZephyrJinja})
    templates.push_back(t);
  for (const char* t : templates) {
    for (const auto& messages : {kPirate, without_system(kPirate)}) {
      for (bool gen : {false, true}) {
        nlohmann::ordered_json m = nlohmann::ordered_json::array();
        for (const Message& msg : messages) m.push_back({{"role", role_name(msg.role)}, {"content", msg.content}});
        cases.push_back({{"template", t}, {"messages", m}, {"add_generation_prompt", gen}});
        ours.push_back(render_jinja(t, messages, gen));
      }
    }
  }
  dir.file("cases.json", cases.dump());
  dir.file("render.py", R"(import json, sys, jinja2
from jinja2.ext import loopcontrols
def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)
env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.globals["raise_exception"] = raise_exception
env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)  # Hugging Face's: keys unsorted
out = []
for case in json.load(open(sys.argv[1])):
    out.append(env.from_string(case["template"]).render(messages=case["messages"], bos_token="<s>",
               eos_token="</s>", add_generation_prompt=case["add_generation_prompt"]))
json.dump(out, open(sys.argv[2], "w"))
)");
  const std::string cmd = "/usr/bin/python3 " + (dir.path() / "render.py").string() + " " +
                          (dir.path() / "cases.json").string() + " " + (dir.path() / "theirs.json").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const auto theirs = nlohmann::json::parse(read_file(dir.path() / "theirs.json"));
  ASSERT_EQ(theirs.size(), ours.size());
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_EQ(ours[i], theirs[i].get<std::string>()) << "case " << i << ": " << cases[i]["template"];
  }
}

}  // namespace
}  // namespace flotilla::data
