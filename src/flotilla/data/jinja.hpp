// A small Jinja interpreter for chat templates: the subset that tokenizer_config.json
// "chat_template" strings use, rendered as Hugging Face renders them (jinja2 with
// trim_blocks, lstrip_blocks and the loop-controls extension).
//
// Supported: {{ expr }}, {% if/elif/else/endif %}, {% for x in xs %} (also `for k, v in`,
// `else`, `loop.index/index0/first/last/length/revindex/revindex0`, break/continue),
// {% set x = expr %} and {% set ns.attr = expr %} with namespace(), comments, whitespace
// control ({%- -%} {{- -}}); literals (strings, integers, true/false/none, lists, dicts),
// variables, .attr and [item] access, slices, + - * // % ~, comparisons, and/or/not,
// in/not in, `a if c else b`, tests (is defined, none, string, ...), filters (trim, length,
// upper, lower, title, capitalize, default, first, last, join, list, replace, tojson,
// string, int, selectattr/rejectattr with equalto), string methods (strip, startswith,
// split, ...), dict .items()/.get(), raise_exception(msg) and range(n).
// Anything else (macros, call blocks, includes, unknown filters or tests) is an InputError
// naming the construct and its line.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace flotilla::data::jinja {

struct Value;
using List = std::vector<Value>;
// Keys in insertion order, as Python dicts keep them (tojson and items() show it).
using Dict = std::vector<std::pair<std::string, Value>>;

// Undefined is what a missing variable or key evaluates to: it renders as "" and is
// falsy, as in jinja2's default Undefined.
struct Undefined {};
struct None {};

struct Value {
  std::variant<Undefined, None, bool, int64_t, std::string, std::shared_ptr<List>, std::shared_ptr<Dict>> v;

  Value() = default;
  Value(None n) : v(n) {}
  Value(bool b) : v(b) {}
  Value(int64_t i) : v(i) {}
  Value(int i) : v(static_cast<int64_t>(i)) {}
  Value(std::string s) : v(std::move(s)) {}
  Value(const char* s) : v(std::string(s)) {}
  Value(List l) : v(std::make_shared<List>(std::move(l))) {}
  Value(Dict d) : v(std::make_shared<Dict>(std::move(d))) {}
};

// A parsed template; parse once, render many times. InputError (component "data/jinja")
// for a syntax error or an unsupported construct, naming it and the template line.
class Template {
 public:
  explicit Template(std::string_view source);
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;

  // Renders with these global variables (messages, bos_token, add_generation_prompt, ...).
  // InputError for an error while rendering (a type error, raise_exception(msg): the
  // message is the template's own).
  std::string render(const Dict& globals) const;

  struct Node;

 private:
  std::vector<std::unique_ptr<Node>> body_;
};

}  // namespace flotilla::data::jinja
