// The Jinja subset of chat templates, in three steps: the *lexer* cuts the source into
// text, {{ output }} and {% statement %} pieces and applies the whitespace rules
// (trim_blocks, lstrip_blocks, the '-' markers); the *parser* turns statement pieces into a
// tree of nodes and expressions; the *renderer* walks the tree with a stack of scopes.
// Values follow Python's semantics where templates can tell (str(), truthiness, equality).
#include "flotilla/data/jinja.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <functional>
#include <optional>

#include "flotilla/base/error.hpp"
#include "flotilla/data/chat_template.hpp"

namespace flotilla::data::jinja {
namespace {

constexpr const char* kJinjaComponent = "data/jinja";

[[noreturn]] void fail(int line, std::string_view what) {
  throw InputError(kJinjaComponent, fmt::format("chat template line {}: {}", line, what));
}

[[noreturn]] void unsupported(int line, std::string_view construct) {
  fail(line, fmt::format("{} is not supported by flotilla's chat template renderer", construct));
}

// ---- Values ---------------------------------------------------------------------------

bool is_undefined(const Value& v) { return std::holds_alternative<Undefined>(v.v); }
bool is_none(const Value& v) { return std::holds_alternative<None>(v.v); }
const std::string* as_string(const Value& v) { return std::get_if<std::string>(&v.v); }
const int64_t* as_int(const Value& v) { return std::get_if<int64_t>(&v.v); }
const List* as_list(const Value& v) {
  const auto* p = std::get_if<std::shared_ptr<List>>(&v.v);
  return p ? p->get() : nullptr;
}
Dict* as_dict(const Value& v) {
  const auto* p = std::get_if<std::shared_ptr<Dict>>(&v.v);
  return p ? p->get() : nullptr;
}

const char* type_name(const Value& v) {
  switch (v.v.index()) {
    case 0: return "undefined";
    case 1: return "none";
    case 2: return "bool";
    case 3: return "int";
    case 4: return "string";
    case 5: return "list";
    default: return "dict";
  }
}

const Value* dict_find(const Dict& d, std::string_view key) {
  for (const auto& [k, v] : d)
    if (k == key) return &v;
  return nullptr;
}

void dict_set(Dict& d, const std::string& key, Value value) {
  for (auto& [k, v] : d) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  d.emplace_back(key, std::move(value));
}

bool truthy(const Value& v) {
  switch (v.v.index()) {
    case 0:
    case 1: return false;
    case 2: return std::get<bool>(v.v);
    case 3: return std::get<int64_t>(v.v) != 0;
    case 4: return !std::get<std::string>(v.v).empty();
    case 5: return !as_list(v)->empty();
    default: return !as_dict(v)->empty();
  }
}

std::string repr(const Value& v);

// Python's str().
std::string to_str(const Value& v) {
  switch (v.v.index()) {
    case 0: return "";
    case 1: return "None";
    case 2: return std::get<bool>(v.v) ? "True" : "False";
    case 3: return std::to_string(std::get<int64_t>(v.v));
    case 4: return std::get<std::string>(v.v);
    default: return repr(v);
  }
}

// Python's repr(), for lists and dicts printed as text.
std::string repr(const Value& v) {
  if (const std::string* s = as_string(v)) {
    const char quote = s->find('\'') != std::string::npos && s->find('"') == std::string::npos ? '"' : '\'';
    std::string out(1, quote);
    for (char c : *s) {
      if (c == '\\' || c == quote) out += '\\';
      if (c == '\n') {
        out += "\\n";
        continue;
      }
      out += c;
    }
    return out + quote;
  }
  if (const List* l = as_list(v)) {
    std::string out = "[";
    for (size_t i = 0; i < l->size(); ++i) out += (i ? ", " : "") + repr((*l)[i]);
    return out + "]";
  }
  if (const Dict* d = as_dict(v)) {
    std::string out = "{";
    for (size_t i = 0; i < d->size(); ++i)
      out += (i ? ", " : "") + repr(Value((*d)[i].first)) + ": " + repr((*d)[i].second);
    return out + "}";
  }
  return to_str(v);
}

// json.dumps(v, ensure_ascii=False): Hugging Face's tojson.
std::string to_json(const Value& v, int line) {
  switch (v.v.index()) {
    case 0:
    case 1: return "null";
    case 2: return std::get<bool>(v.v) ? "true" : "false";
    case 3: return std::to_string(std::get<int64_t>(v.v));
    case 4: {
      std::string out = "\"";
      for (unsigned char c : std::get<std::string>(v.v)) {
        switch (c) {
          case '"': out += "\\\""; break;
          case '\\': out += "\\\\"; break;
          case '\n': out += "\\n"; break;
          case '\r': out += "\\r"; break;
          case '\t': out += "\\t"; break;
          default:
            if (c < 0x20) {
              out += fmt::format("\\u{:04x}", c);
            } else {
              out += static_cast<char>(c);
            }
        }
      }
      return out + "\"";
    }
    case 5: {
      std::string out = "[";
      const List& l = *as_list(v);
      for (size_t i = 0; i < l.size(); ++i) out += (i ? ", " : "") + to_json(l[i], line);
      return out + "]";
    }
    default: {
      std::string out = "{";
      const Dict& d = *as_dict(v);
      for (size_t i = 0; i < d.size(); ++i)
        out += (i ? ", " : "") + to_json(Value(d[i].first), line) + ": " + to_json(d[i].second, line);
      return out + "}";
    }
  }
}

bool equals(const Value& a, const Value& b) {
  if (a.v.index() != b.v.index()) {
    // Python: True == 1.
    const auto num = [](const Value& x) -> std::optional<int64_t> {
      if (const auto* i = as_int(x)) return *i;
      if (const auto* b2 = std::get_if<bool>(&x.v)) return *b2 ? 1 : 0;
      return std::nullopt;
    };
    const auto na = num(a), nb = num(b);
    return na && nb && *na == *nb;
  }
  switch (a.v.index()) {
    case 0:
    case 1: return true;
    case 2: return std::get<bool>(a.v) == std::get<bool>(b.v);
    case 3: return std::get<int64_t>(a.v) == std::get<int64_t>(b.v);
    case 4: return std::get<std::string>(a.v) == std::get<std::string>(b.v);
    case 5: {
      const List &x = *as_list(a), &y = *as_list(b);
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i)
        if (!equals(x[i], y[i])) return false;
      return true;
    }
    default: {
      const Dict &x = *as_dict(a), &y = *as_dict(b);
      if (x.size() != y.size()) return false;
      for (const auto& [k, v] : x) {
        const Value* other = dict_find(y, k);
        if (other == nullptr || !equals(v, *other)) return false;
      }
      return true;
    }
  }
}

// ---- Lexer ----------------------------------------------------------------------------

enum class PieceKind { text, output, statement };

struct Piece {
  PieceKind kind;
  std::string body;  // text, or the inside of the tag without its markers
  int line;
};

int count_lines(std::string_view s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

// End of a tag body starting at `from`: the index of `close` ("}}" or "%}") outside string
// literals, or npos.
size_t find_tag_end(std::string_view src, size_t from, std::string_view close) {
  char quote = 0;
  for (size_t i = from; i < src.size(); ++i) {
    const char c = src[i];
    if (quote != 0) {
      if (c == '\\') {
        ++i;
      } else if (c == quote) {
        quote = 0;
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
    } else if (src.compare(i, close.size(), close) == 0) {
      return i;
    }
  }
  return std::string_view::npos;
}

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::vector<Piece> lex(std::string_view src) {
  std::vector<Piece> pieces;
  size_t pos = 0;
  int line = 1;
  bool line_starting = true;   // the text that follows starts a line (for lstrip_blocks)
  bool strip_next = false;     // a '-' marker: drop all leading whitespace of the next text
  bool trim_newline = false;   // trim_blocks: drop one newline right after a block tag
  while (pos <= src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string_view::npos && open + 1 < src.size() && src[open + 1] != '{' &&
           src[open + 1] != '%' && src[open + 1] != '#') {
      open = src.find('{', open + 1);
    }
    if (open != std::string_view::npos && open + 1 >= src.size()) open = std::string_view::npos;
    const size_t text_end = open == std::string_view::npos ? src.size() : open;
    std::string text(src.substr(pos, text_end - pos));
    const int text_line = line;
    line += count_lines(text);
    if (strip_next) {
      const size_t first = std::find_if_not(text.begin(), text.end(), is_ws) - text.begin();
      text.erase(0, first);
    } else if (trim_newline && !text.empty() && text.front() == '\n') {
      text.erase(0, 1);
    }
    strip_next = trim_newline = false;
    if (open == std::string_view::npos) {
      if (!text.empty()) pieces.push_back({PieceKind::text, text, text_line});
      break;
    }
    const char kind = src[open + 1];
    size_t body_begin = open + 2;
    const bool minus_before = body_begin < src.size() && src[body_begin] == '-';
    const bool plus_before = body_begin < src.size() && src[body_begin] == '+';
    if (minus_before || plus_before) ++body_begin;
    const std::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t end = kind == '#' ? src.find(close, body_begin) : find_tag_end(src, body_begin, close);
    if (end == std::string_view::npos) fail(line, fmt::format("'{{{}' is never closed by '{}'", kind, close));
    const bool minus_after = end > body_begin && src[end - 1] == '-';
    const bool block = kind != '{';
    if (minus_before) {
      while (!text.empty() && is_ws(text.back())) text.pop_back();
    } else if (block && !plus_before) {
      // lstrip_blocks: spaces and tabs between the start of a line and a block tag go.
      const size_t nl = text.rfind('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      if ((nl != std::string::npos || line_starting) &&
          text.find_first_not_of(" \t", from) == std::string::npos) {
        text.erase(from);
      }
    }
    if (!text.empty()) pieces.push_back({PieceKind::text, text, text_line});
    std::string body(src.substr(body_begin, end - body_begin - (minus_after ? 1 : 0)));
    if (kind != '#') pieces.push_back({kind == '{' ? PieceKind::output : PieceKind::statement, body, line});
    line += count_lines(src.substr(open, end - open));
    pos = end + 2;
    strip_next = minus_after;
    trim_newline = block && !minus_after;
    line_starting = trim_newline && pos < src.size() && src[pos] == '\n';
  }
  return pieces;
}

// ---- Expressions ----------------------------------------------------------------------

struct Token {
  enum Kind { name, string, integer, op, end } kind;
  std::string text;
  int64_t number = 0;
};

std::vector<Token> tokenize(std::string_view s, int line) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (is_ws(c)) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Token::name, std::string(s.substr(i, j - i))});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      int64_t n = 0;
      while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) n = n * 10 + (s[j++] - '0');
      if (j < s.size() && s[j] == '.' && j + 1 < s.size() && std::isdigit(static_cast<unsigned char>(s[j + 1])))
        unsupported(line, "a floating-point number");
      out.push_back({Token::integer, std::string(s.substr(i, j - i)), n});
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string text;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          const char e = s[++j];
          switch (e) {
            case 'n': text += '\n'; break;
            case 't': text += '\t'; break;
            case 'r': text += '\r'; break;
            case '\\': text += '\\'; break;
            case '\'': text += '\''; break;
            case '"': text += '"'; break;
            default: text += '\\', text += e;
          }
        } else {
          text += s[j];
        }
      }
      if (j >= s.size()) fail(line, "a string literal is never closed");
      out.push_back({Token::string, std::move(text)});
      i = j + 1;
    } else {
      static constexpr std::string_view kTwo[] = {"==", "!=", "<=", ">=", "//", "**"};
      std::string op(1, c);
      for (std::string_view two : kTwo)
        if (s.compare(i, 2, two) == 0) op = std::string(two);
      if (std::string_view("()[]{}.,:|~+-*/%<>=!").find(c) == std::string_view::npos)
        fail(line, fmt::format("unexpected character '{}'", c));
      out.push_back({Token::op, op});
      i += op.size();
    }
  }
  out.push_back({Token::end, ""});
  return out;
}

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

struct Expr {
  enum Kind { literal, variable, attribute, item, slice, call, filter, test, negate, minus, binary, conditional,
              list_literal, dict_literal } kind;
  int line = 0;
  Value value;            // literal
  std::string name;       // variable, attribute, filter, test, binary operator, called function or method
  std::vector<ExprPtr> args;  // operands; for filter/test/call/method the subject first (may be null)
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;   // `is not`
};

class ExprParser {
 public:
  ExprParser(std::vector<Token> tokens, int line) : toks_(std::move(tokens)), line_(line) {}

  ExprPtr parse_expression() { return parse_conditional(); }
  bool at_end() const { return toks_[pos_].kind == Token::end; }
  const Token& peek(size_t ahead = 0) const { return toks_[std::min(pos_ + ahead, toks_.size() - 1)]; }
  bool is_op(std::string_view op, size_t ahead = 0) const {
    return peek(ahead).kind == Token::op && peek(ahead).text == op;
  }
  bool is_name(std::string_view n, size_t ahead = 0) const {
    return peek(ahead).kind == Token::name && peek(ahead).text == n;
  }
  void expect_op(std::string_view op) {
    if (!is_op(op)) fail(line_, fmt::format("expected '{}' but found '{}'", op, describe(peek())));
    ++pos_;
  }
  std::string expect_name() {
    if (peek().kind != Token::name) fail(line_, fmt::format("expected a name but found '{}'", describe(peek())));
    return toks_[pos_++].text;
  }
  void expect_end() {
    if (!at_end()) fail(line_, fmt::format("unexpected '{}'", describe(peek())));
  }
  int line() const { return line_; }

 private:
  static std::string describe(const Token& t) { return t.kind == Token::end ? "end of tag" : t.text; }

  ExprPtr make(Expr::Kind kind, std::string name, std::vector<ExprPtr> args) const {
    auto e = std::make_shared<Expr>();
    e->kind = kind;
    e->line = line_;
    e->name = std::move(name);
    e->args = std::move(args);
    return e;
  }

  ExprPtr parse_conditional() {
    ExprPtr value = parse_or();
    if (!is_name("if")) return value;
    ++pos_;
    ExprPtr condition = parse_or();
    ExprPtr otherwise;
    if (is_name("else")) {
      ++pos_;
      otherwise = parse_conditional();
    }
    return make(Expr::conditional, "", {condition, value, otherwise});
  }
  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      ++pos_;
      left = make(Expr::binary, "or", {left, parse_and()});
    }
    return left;
  }
  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      ++pos_;
      left = make(Expr::binary, "and", {left, parse_not()});
    }
    return left;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      ++pos_;
      return make(Expr::negate, "", {parse_not()});
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    ExprPtr left = parse_math1();
    for (;;) {
      if (peek().kind == Token::op &&
          (is_op("==") || is_op("!=") || is_op("<") || is_op(">") || is_op("<=") || is_op(">="))) {
        const std::string op = toks_[pos_++].text;
        left = make(Expr::binary, op, {left, parse_math1()});
      } else if (is_name("in")) {
        ++pos_;
        left = make(Expr::binary, "in", {left, parse_math1()});
      } else if (is_name("not") && is_name("in", 1)) {
        pos_ += 2;
        left = make(Expr::binary, "not in", {left, parse_math1()});
      } else {
        return left;
      }
    }
  }
  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = toks_[pos_++].text;
      left = make(Expr::binary, op, {left, parse_concat()});
    }
    return left;
  }
  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (is_op("~")) {
      ++pos_;
      left = make(Expr::binary, "~", {left, parse_math2()});
    }
    return left;
  }
  ExprPtr parse_math2() {
    ExprPtr left = parse_unary();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = toks_[pos_++].text;
      if (op == "/") unsupported(line_, "the '/' operator (true division)");
      left = make(Expr::binary, op, {left, parse_unary()});
    }
    if (is_op("**")) unsupported(line_, "the '**' operator");
    return left;
  }
  ExprPtr parse_unary() {
    if (is_op("-")) {
      ++pos_;
      return parse_filters(make(Expr::minus, "", {parse_unary()}));
    }
    return parse_filters(parse_postfix(parse_primary()));
  }
  std::vector<ExprPtr> parse_call_args(std::vector<std::pair<std::string, ExprPtr>>* kwargs) {
    std::vector<ExprPtr> args;
    expect_op("(");
    while (!is_op(")")) {
      if (peek().kind == Token::name && is_op("=", 1)) {
        std::string key = expect_name();
        ++pos_;
        kwargs->emplace_back(std::move(key), parse_expression());
      } else {
        args.push_back(parse_expression());
      }
      if (!is_op(",")) break;
      ++pos_;
    }
    expect_op(")");
    return args;
  }
  ExprPtr parse_filters(ExprPtr subject) {
    for (;;) {
      if (is_op("|")) {
        ++pos_;
        auto e = std::make_shared<Expr>();
        e->kind = Expr::filter;
        e->line = line_;
        e->name = expect_name();
        e->args.push_back(subject);
        if (is_op("(")) {
          for (auto& a : parse_call_args(&e->kwargs)) e->args.push_back(std::move(a));
        }
        subject = e;
      } else if (is_name("is")) {
        ++pos_;
        auto e = std::make_shared<Expr>();
        e->kind = Expr::test;
        e->line = line_;
        if (is_name("not")) {
          ++pos_;
          e->negated = true;
        }
        if (is_name("none") || is_name("true") || is_name("false")) {
          e->name = toks_[pos_++].text;
        } else {
          e->name = expect_name();
        }
        e->args.push_back(subject);
        if (is_op("(")) {
          for (auto& a : parse_call_args(&e->kwargs)) e->args.push_back(std::move(a));
        } else if (peek().kind == Token::string || peek().kind == Token::integer ||
                   (peek().kind == Token::name && !is_name("and") && !is_name("or") && !is_name("if") &&
                    !is_name("else") && !is_name("is") && !is_name("in") && !is_name("not"))) {
          e->args.push_back(parse_primary());  // `is equalto 'x'`, `is sameas none`
        }
        subject = e;
      } else {
        return subject;
      }
    }
  }
  ExprPtr parse_postfix(ExprPtr subject) {
    for (;;) {
      if (is_op(".")) {
        ++pos_;
        std::string attr = peek().kind == Token::integer ? toks_[pos_++].text : expect_name();
        if (is_op("(")) {
          auto e = std::make_shared<Expr>();
          e->kind = Expr::call;
          e->line = line_;
          e->name = std::move(attr);
          e->args.push_back(subject);
          for (auto& a : parse_call_args(&e->kwargs)) e->args.push_back(std::move(a));
          subject = e;
        } else {
          subject = make(Expr::attribute, std::move(attr), {subject});
        }
      } else if (is_op("[")) {
        ++pos_;
        ExprPtr begin, end, step;
        bool is_slice = false;
        if (!is_op(":")) begin = parse_expression();
        if (is_op(":")) {
          is_slice = true;
          ++pos_;
          if (!is_op("]") && !is_op(":")) end = parse_expression();
          if (is_op(":")) {
            ++pos_;
            if (!is_op("]")) step = parse_expression();
          }
        }
        expect_op("]");
        subject = is_slice ? make(Expr::slice, "", {subject, begin, end, step}) : make(Expr::item, "", {subject, begin});
      } else if (is_op("(")) {
        if (subject->kind != Expr::variable) unsupported(line_, "calling this value");
        auto e = std::make_shared<Expr>();
        e->kind = Expr::call;
        e->line = line_;
        e->name = subject->name;
        e->args.push_back(nullptr);  // a global function: no subject
        for (auto& a : parse_call_args(&e->kwargs)) e->args.push_back(std::move(a));
        subject = e;
      } else {
        return subject;
      }
    }
  }
  ExprPtr parse_primary() {
    const Token t = peek();
    ++pos_;
    auto lit = [&](Value v) {
      auto e = std::make_shared<Expr>();
      e->kind = Expr::literal;
      e->line = line_;
      e->value = std::move(v);
      return e;
    };
    switch (t.kind) {
      case Token::string: {
        std::string s = t.text;
        while (peek().kind == Token::string) s += toks_[pos_++].text;  // 'a' 'b' concatenates
        return lit(Value(std::move(s)));
      }
      case Token::integer: return lit(Value(t.number));
      case Token::name:
        if (t.text == "true" || t.text == "True") return lit(Value(true));
        if (t.text == "false" || t.text == "False") return lit(Value(false));
        if (t.text == "none" || t.text == "None") return lit(Value(None{}));
        return make(Expr::variable, t.text, {});
      case Token::op:
        if (t.text == "(") {
          ExprPtr inner = parse_expression();
          if (is_op(",")) unsupported(line_, "a tuple");
          expect_op(")");
          return inner;
        }
        if (t.text == "[") {
          std::vector<ExprPtr> items;
          while (!is_op("]")) {
            items.push_back(parse_expression());
            if (!is_op(",")) break;
            ++pos_;
          }
          expect_op("]");
          return make(Expr::list_literal, "", std::move(items));
        }
        if (t.text == "{") {
          auto e = std::make_shared<Expr>();
          e->kind = Expr::dict_literal;
          e->line = line_;
          while (!is_op("}")) {
            ExprPtr key = parse_expression();
            expect_op(":");
            e->args.push_back(key);
            e->args.push_back(parse_expression());
            if (!is_op(",")) break;
            ++pos_;
          }
          expect_op("}");
          return e;
        }
        break;
      case Token::end: break;
    }
    fail(line_, fmt::format("expected a value but found '{}'", describe(t)));
  }

  std::vector<Token> toks_;
  size_t pos_ = 0;
  int line_;
};

}  // namespace

// ---- Statements -----------------------------------------------------------------------

struct Template::Node {
  enum Kind { raw_text, output, if_chain, for_loop, set, break_loop, continue_loop } kind;
  int line = 0;
  std::string text;
  ExprPtr expr;                     // output, set value, for iterable
  std::vector<std::string> targets;  // for: loop variables; set: name, or namespace and attribute
  ExprPtr loop_filter;              // for ... if cond
  std::vector<std::pair<ExprPtr, std::vector<std::unique_ptr<Node>>>> branches;  // if: condition (null: else)
  std::vector<std::unique_ptr<Node>> body, else_body;
};

namespace {

using Node = Template::Node;
using NodeList = std::vector<std::unique_ptr<Node>>;

class StatementParser {
 public:
  explicit StatementParser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  NodeList parse_all() {
    NodeList body;
    const std::string end = parse_block(body, {});
    if (!end.empty()) fail(last_line_, fmt::format("'{{% {} %}}' without a matching opening tag", end));
    return body;
  }

 private:
  // Parses nodes into `body` until a statement whose keyword is in `ends`; returns that
  // keyword (its tag's remaining tokens in *rest), or "" at the end of the template.
  std::string parse_block(NodeList& body, std::initializer_list<std::string_view> ends,
                          std::unique_ptr<ExprParser>* rest = nullptr) {
    while (pos_ < pieces_.size()) {
      const Piece& p = pieces_[pos_++];
      last_line_ = p.line;
      auto node = std::make_unique<Node>();
      node->line = p.line;
      if (p.kind == PieceKind::text) {
        node->kind = Node::raw_text;
        node->text = p.body;
        body.push_back(std::move(node));
        continue;
      }
      auto parser = std::make_unique<ExprParser>(tokenize(p.body, p.line), p.line);
      if (p.kind == PieceKind::output) {
        node->kind = Node::output;
        node->expr = parser->parse_expression();
        parser->expect_end();
        body.push_back(std::move(node));
        continue;
      }
      const std::string keyword = parser->expect_name();
      if (std::find(ends.begin(), ends.end(), keyword) != ends.end()) {
        if (rest) *rest = std::move(parser);
        return keyword;
      }
      if (keyword == "if") {
        parse_if(*node, *parser);
      } else if (keyword == "for") {
        parse_for(*node, *parser);
      } else if (keyword == "set") {
        parse_set(*node, *parser);
      } else if (keyword == "break" || keyword == "continue") {
        parser->expect_end();
        node->kind = keyword == "break" ? Node::break_loop : Node::continue_loop;
      } else if (keyword == "endif" || keyword == "endfor" || keyword == "elif" || keyword == "else") {
        fail(p.line, fmt::format("'{{% {} %}}' without a matching opening tag", keyword));
      } else {
        unsupported(p.line, fmt::format("'{{% {} %}}'", keyword));
      }
      body.push_back(std::move(node));
    }
    if (ends.size() != 0) fail(last_line_, fmt::format("'{{% {} %}}' is missing", *ends.begin()));
    return "";
  }

  void parse_if(Node& node, ExprParser& head) {
    node.kind = Node::if_chain;
    ExprPtr condition = head.parse_expression();
    head.expect_end();
    for (;;) {
      NodeList branch;
      std::unique_ptr<ExprParser> rest;
      const std::string end = parse_block(branch, {"endif", "elif", "else"}, &rest);
      node.branches.emplace_back(condition, std::move(branch));
      if (end == "endif") {
        rest->expect_end();
        return;
      }
      if (end == "elif") {
        condition = rest->parse_expression();
      } else {
        condition = nullptr;
        if (!node.branches.empty() && node.branches.back().first == nullptr && node.branches.size() > 1 &&
            node.branches[node.branches.size() - 2].first == nullptr)
          fail(rest->line(), "two '{% else %}' in one if");
      }
      rest->expect_end();
      if (!condition && end == "else") {
        NodeList last;
        std::unique_ptr<ExprParser> close;
        const std::string after = parse_block(last, {"endif", "elif", "else"}, &close);
        if (after != "endif") fail(close->line(), fmt::format("'{{% {} %}}' after '{{% else %}}'", after));
        close->expect_end();
        node.branches.emplace_back(nullptr, std::move(last));
        return;
      }
    }
  }

  void parse_for(Node& node, ExprParser& head) {
    node.kind = Node::for_loop;
    node.targets.push_back(head.expect_name());
    while (head.is_op(",")) {
      head.expect_op(",");
      node.targets.push_back(head.expect_name());
    }
    if (!head.is_name("in")) fail(head.line(), "expected 'in' in the for loop");
    head.expect_name();
    node.expr = head.parse_expression();
    // `for x in xs if cond`: parse_expression took `xs if cond` as a conditional without else.
    if (node.expr->kind == Expr::conditional && node.expr->args[2] == nullptr) {
      node.loop_filter = node.expr->args[0];
      node.expr = node.expr->args[1];
    }
    if (head.is_name("recursive")) unsupported(head.line(), "a recursive for loop");
    head.expect_end();
    std::unique_ptr<ExprParser> rest;
    std::string end = parse_block(node.body, {"endfor", "else"}, &rest);
    rest->expect_end();
    if (end == "else") {
      end = parse_block(node.else_body, {"endfor"}, &rest);
      rest->expect_end();
    }
  }

  void parse_set(Node& node, ExprParser& head) {
    node.kind = Node::set;
    node.targets.push_back(head.expect_name());
    if (head.is_op(".")) {
      head.expect_op(".");
      node.targets.push_back(head.expect_name());
    }
    if (head.is_op(",")) unsupported(head.line(), "assigning to several names in one set");
    if (!head.is_op("=")) unsupported(head.line(), "a '{% set %}...{% endset %}' block");
    head.expect_op("=");
    node.expr = head.parse_expression();
    head.expect_end();
  }

  std::vector<Piece> pieces_;
  size_t pos_ = 0;
  int last_line_ = 1;
};

// ---- Rendering ------------------------------------------------------------------------

enum class Flow { normal, break_loop, continue_loop };

class Renderer {
 public:
  explicit Renderer(const Dict& globals) { scopes_.push_back(globals); }

  Flow run(const NodeList& nodes, std::string& out) {
    for (const auto& node : nodes) {
      const Flow flow = run(*node, out);
      if (flow != Flow::normal) return flow;
    }
    return Flow::normal;
  }

 private:
  Flow run(const Node& node, std::string& out) {
    switch (node.kind) {
      case Node::raw_text: out += node.text; break;
      case Node::output: out += to_str(eval(*node.expr)); break;
      case Node::set: {
        Value value = eval(*node.expr);
        if (node.targets.size() == 1) {
          dict_set(scopes_.back(), node.targets[0], std::move(value));
        } else {
          Dict* ns = as_dict(lookup(node.targets[0]));
          if (ns == nullptr) fail(node.line, fmt::format("'{}' is not a namespace", node.targets[0]));
          dict_set(*ns, node.targets[1], std::move(value));
        }
        break;
      }
      case Node::if_chain:
        for (const auto& [condition, body] : node.branches) {
          if (!condition || truthy(eval(*condition))) return run(body, out);
        }
        break;
      case Node::for_loop: return run_for(node, out);
      case Node::break_loop: return Flow::break_loop;
      case Node::continue_loop: return Flow::continue_loop;
    }
    return Flow::normal;
  }

  Flow run_for(const Node& node, std::string& out) {
    const Value iterable = eval(*node.expr);
    List items;
    if (const List* l = as_list(iterable)) {
      items = *l;
    } else if (const Dict* d = as_dict(iterable)) {
      for (const auto& kv : *d) items.emplace_back(kv.first);
    } else if (const std::string* s = as_string(iterable)) {
      for (char c : *s) items.emplace_back(std::string(1, c));
    } else if (!is_undefined(iterable) && !is_none(iterable)) {
      fail(node.line, fmt::format("cannot loop over a {}", type_name(iterable)));
    }
    scopes_.emplace_back();
    auto bind = [&](const Value& item) {
      if (node.targets.size() == 1) {
        dict_set(scopes_.back(), node.targets[0], item);
        return;
      }
      const List* parts = as_list(item);
      if (parts == nullptr || parts->size() != node.targets.size())
        fail(node.line, fmt::format("cannot unpack a {} into {} loop variables", type_name(item), node.targets.size()));
      for (size_t k = 0; k < parts->size(); ++k) dict_set(scopes_.back(), node.targets[k], (*parts)[k]);
    };
    if (node.loop_filter) {
      List kept;
      for (const Value& item : items) {
        bind(item);
        if (truthy(eval(*node.loop_filter))) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      bind(items[static_cast<size_t>(i)]);
      dict_set(scopes_.back(), "loop",
               Value(Dict{{"index", Value(i + 1)}, {"index0", Value(i)}, {"revindex", Value(n - i)},
                          {"revindex0", Value(n - i - 1)}, {"first", Value(i == 0)}, {"last", Value(i == n - 1)},
                          {"length", Value(n)},
                          {"previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value()},
                          {"nextitem", i + 1 < n ? items[static_cast<size_t>(i + 1)] : Value()}}));
      if (run(node.body, out) == Flow::break_loop) break;
    }
    if (n == 0) run(node.else_body, out);
    scopes_.pop_back();
    return Flow::normal;
  }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it)
      if (const Value* v = dict_find(*it, name)) return *v;
    return Value();
  }

  static int64_t need_int(const Value& v, int line, std::string_view what) {
    if (const int64_t* i = as_int(v)) return *i;
    if (const bool* b = std::get_if<bool>(&v.v)) return *b ? 1 : 0;
    fail(line, fmt::format("{} needs an integer, not a {}", what, type_name(v)));
  }

  static std::string need_str(const Value& v, int line, std::string_view what) {
    if (const std::string* s = as_string(v)) return *s;
    fail(line, fmt::format("{} needs a string, not a {}", what, type_name(v)));
  }

  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::literal: return e.value;
      case Expr::variable: return lookup(e.name);
      case Expr::attribute: return get_item(eval(*e.args[0]), Value(e.name), e.line, true);
      case Expr::item: return get_item(eval(*e.args[0]), eval(*e.args[1]), e.line, false);
      case Expr::slice: return slice(e);
      case Expr::negate: return Value(!truthy(eval(*e.args[0])));
      case Expr::minus: return Value(-need_int(eval(*e.args[0]), e.line, "'-'"));
      case Expr::conditional:
        if (truthy(eval(*e.args[0]))) return eval(*e.args[1]);
        return e.args[2] ? eval(*e.args[2]) : Value();
      case Expr::binary: return binary(e);
      case Expr::list_literal: {
        List items;
        for (const auto& a : e.args) items.push_back(eval(*a));
        return Value(std::move(items));
      }
      case Expr::dict_literal: {
        Dict d;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2)
          dict_set(d, need_str(eval(*e.args[i]), e.line, "a dict key"), eval(*e.args[i + 1]));
        return Value(std::move(d));
      }
      case Expr::filter: return filter(e);
      case Expr::test: return Value(test(e) != e.negated);
      case Expr::call: return call(e);
    }
    return Value();
  }

  static Value get_item(const Value& subject, const Value& key, int line, bool attribute) {
    if (const Dict* d = as_dict(subject)) {
      if (const std::string* k = as_string(key)) {
        if (const Value* v = dict_find(*d, *k)) return *v;
      }
      return Value();
    }
    if (const int64_t* index = as_int(key); index && !attribute) {
      int64_t i = *index;
      if (const List* l = as_list(subject)) {
        const auto n = static_cast<int64_t>(l->size());
        if (i < 0) i += n;
        return i >= 0 && i < n ? (*l)[static_cast<size_t>(i)] : Value();
      }
      if (const std::string* s = as_string(subject)) {
        const auto n = static_cast<int64_t>(s->size());
        if (i < 0) i += n;
        return i >= 0 && i < n ? Value(std::string(1, (*s)[static_cast<size_t>(i)])) : Value();
      }
    }
    if (is_undefined(subject) || is_none(subject)) {
      fail(line, fmt::format("cannot read '{}' of an undefined value", to_str(key)));
    }
    return Value();
  }

  Value slice(const Expr& e) {
    const Value subject = eval(*e.args[0]);
    const int64_t step = e.args[3] ? need_int(eval(*e.args[3]), e.line, "a slice step") : 1;
    if (step == 0) fail(e.line, "slice step cannot be zero");
    List items;
    const std::string* s = as_string(subject);
    if (const List* l = as_list(subject)) {
      items = *l;
    } else if (s) {
      for (char c : *s) items.emplace_back(std::string(1, c));
    } else {
      fail(e.line, fmt::format("cannot slice a {}", type_name(subject)));
    }
    const auto n = static_cast<int64_t>(items.size());
    // Python's slice.indices().
    auto bound = [&](const ExprPtr& x, int64_t fallback) {
      if (!x) return fallback;
      int64_t v = need_int(eval(*x), e.line, "a slice bound");
      if (v < 0) v += n;
      return step > 0 ? std::clamp<int64_t>(v, 0, n) : std::clamp<int64_t>(v, -1, n - 1);
    };
    const int64_t begin = bound(e.args[1], step > 0 ? 0 : n - 1);
    const int64_t end = bound(e.args[2], step > 0 ? n : -1);
    List out;
    for (int64_t i = begin; step > 0 ? i < end : i > end; i += step) out.push_back(items[static_cast<size_t>(i)]);
    if (s) {
      std::string text;
      for (const Value& c : out) text += std::get<std::string>(c.v);
      return Value(std::move(text));
    }
    return Value(std::move(out));
  }

  Value binary(const Expr& e) {
    const std::string& op = e.name;
    if (op == "and") {
      Value left = eval(*e.args[0]);
      return truthy(left) ? eval(*e.args[1]) : left;
    }
    if (op == "or") {
      Value left = eval(*e.args[0]);
      return truthy(left) ? left : eval(*e.args[1]);
    }
    const Value a = eval(*e.args[0]), b = eval(*e.args[1]);
    if (op == "~") return Value(to_str(a) + to_str(b));
    if (op == "==") return Value(equals(a, b));
    if (op == "!=") return Value(!equals(a, b));
    if (op == "in" || op == "not in") {
      bool found = false;
      if (const std::string* hay = as_string(b)) {
        found = hay->find(need_str(a, e.line, "'in' on a string")) != std::string::npos;
      } else if (const List* l = as_list(b)) {
        found = std::any_of(l->begin(), l->end(), [&](const Value& x) { return equals(x, a); });
      } else if (const Dict* d = as_dict(b)) {
        const std::string* key = as_string(a);
        found = key && dict_find(*d, *key) != nullptr;
      } else {
        fail(e.line, fmt::format("'in' needs a string, list or dict on its right, not a {}", type_name(b)));
      }
      return Value(found != (op == "not in"));
    }
    if (op == "+") {
      if (as_string(a) && as_string(b)) return Value(*as_string(a) + *as_string(b));
      if (as_list(a) && as_list(b)) {
        List joined = *as_list(a);
        joined.insert(joined.end(), as_list(b)->begin(), as_list(b)->end());
        return Value(std::move(joined));
      }
      if (as_string(a) || as_string(b))
        fail(e.line, fmt::format("cannot add a {} and a {} with '+' (use '~' to join as text)", type_name(a),
                                 type_name(b)));
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int cmp = 0;
      if (as_string(a) && as_string(b)) {
        cmp = as_string(a)->compare(*as_string(b));
      } else {
        const int64_t x = need_int(a, e.line, fmt::format("'{}'", op)), y = need_int(b, e.line, fmt::format("'{}'", op));
        cmp = x < y ? -1 : x > y ? 1 : 0;
      }
      return Value(op == "<" ? cmp < 0 : op == ">" ? cmp > 0 : op == "<=" ? cmp <= 0 : cmp >= 0);
    }
    if (op == "*" && as_string(a)) {
      std::string out;
      for (int64_t i = need_int(b, e.line, "'*'"); i > 0; --i) out += *as_string(a);
      return Value(std::move(out));
    }
    const int64_t x = need_int(a, e.line, fmt::format("'{}'", op)), y = need_int(b, e.line, fmt::format("'{}'", op));
    if (op == "+") return Value(x + y);
    if (op == "-") return Value(x - y);
    if (op == "*") return Value(x * y);
    if (y == 0) fail(e.line, "division by zero");
    // Python's floor division and modulo (the sign follows the divisor).
    int64_t q = x / y, r = x % y;
    if (r != 0 && ((r < 0) != (y < 0))) --q, r += y;
    return Value(op == "%" ? r : q);
  }

  std::vector<Value> eval_args(const Expr& e, size_t from) {
    std::vector<Value> out;
    for (size_t i = from; i < e.args.size(); ++i) out.push_back(eval(*e.args[i]));
    return out;
  }

  static Value arg(const std::vector<Value>& args, size_t i, const Expr& e, std::string_view kw = {}) {
    if (i < args.size()) return args[i];
    return Value();
    (void)e, (void)kw;
  }

  Value kwarg_or(const Expr& e, const std::vector<Value>& args, size_t i, std::string_view name, Value fallback) {
    if (i < args.size()) return args[i];
    for (const auto& [k, v] : e.kwargs)
      if (k == name) return eval(*v);
    return fallback;
  }

  Value filter(const Expr& e) {
    const Value subject = eval(*e.args[0]);
    const std::vector<Value> args = eval_args(e, 1);
    const std::string& f = e.name;
    if (f == "trim") return Value(std::string(python_strip(need_str(subject, e.line, "trim"))));
    if (f == "length" || f == "count") {
      if (const List* l = as_list(subject)) return Value(static_cast<int64_t>(l->size()));
      if (const Dict* d = as_dict(subject)) return Value(static_cast<int64_t>(d->size()));
      return Value(static_cast<int64_t>(need_str(subject, e.line, "length").size()));
    }
    if (f == "upper" || f == "lower" || f == "title" || f == "capitalize")
      return string_method(f, need_str(subject, e.line, f), {}, e);
    if (f == "default" || f == "d") {
      const bool boolean = truthy(kwarg_or(e, args, 1, "boolean", Value(false)));
      const bool use_default = boolean ? !truthy(subject) : is_undefined(subject);
      return use_default ? kwarg_or(e, args, 0, "default_value", Value(std::string())) : subject;
    }
    if (f == "string") return Value(to_str(subject));
    if (f == "int") {
      if (const std::string* s = as_string(subject)) {
        try {
          return Value(static_cast<int64_t>(std::stoll(*s)));
        } catch (const std::exception&) {
          return Value(0);
        }
      }
      return Value(need_int(subject, e.line, "int"));
    }
    if (f == "tojson") {
      if (!args.empty() || !e.kwargs.empty()) unsupported(e.line, "tojson with arguments");
      return Value(to_json(subject, e.line));
    }
    if (f == "list") {
      if (as_list(subject)) return subject;
      if (const std::string* s = as_string(subject)) {
        List chars;
        for (char c : *s) chars.emplace_back(std::string(1, c));
        return Value(std::move(chars));
      }
      if (const Dict* d = as_dict(subject)) {
        List keys;
        for (const auto& kv : *d) keys.emplace_back(kv.first);
        return Value(std::move(keys));
      }
      fail(e.line, fmt::format("list filter on a {}", type_name(subject)));
    }
    if (f == "first" || f == "last") {
      const List* l = as_list(subject);
      if (l == nullptr) fail(e.line, fmt::format("{} filter on a {}", f, type_name(subject)));
      if (l->empty()) return Value();
      return f == "first" ? l->front() : l->back();
    }
    if (f == "join") {
      const List* l = as_list(subject);
      if (l == nullptr) fail(e.line, fmt::format("join filter on a {}", type_name(subject)));
      const std::string sep = to_str(kwarg_or(e, args, 0, "d", Value(std::string())));
      std::string out;
      for (size_t i = 0; i < l->size(); ++i) out += (i ? sep : "") + to_str((*l)[i]);
      return Value(std::move(out));
    }
    if (f == "replace") return string_method("replace", need_str(subject, e.line, f), args, e);
    if (f == "selectattr" || f == "rejectattr") {
      const List* l = as_list(subject);
      if (l == nullptr) fail(e.line, fmt::format("{} filter on a {}", f, type_name(subject)));
      const std::string attr = need_str(arg(args, 0, e), e.line, f);
      List kept;
      for (const Value& item : *l) {
        const Value v = get_item(item, Value(attr), e.line, true);
        bool pass = false;
        if (args.size() <= 1) {
          pass = truthy(v);
        } else {
          const std::string test_name = need_str(args[1], e.line, f);
          if (test_name == "equalto" || test_name == "eq" || test_name == "==") {
            pass = equals(v, arg(args, 2, e));
          } else if (test_name == "defined") {
            pass = !is_undefined(v);
          } else if (test_name == "undefined") {
            pass = is_undefined(v);
          } else if (test_name == "none") {
            pass = is_none(v);
          } else {
            unsupported(e.line, fmt::format("the test '{}' in {}", test_name, f));
          }
        }
        if (pass == (f == "selectattr")) kept.push_back(item);
      }
      return Value(std::move(kept));
    }
    unsupported(e.line, fmt::format("the filter '{}'", f));
  }

  bool test(const Expr& e) {
    const Value subject = eval(*e.args[0]);
    const std::vector<Value> args = eval_args(e, 1);
    const std::string& t = e.name;
    if (t == "defined") return !is_undefined(subject);
    if (t == "undefined") return is_undefined(subject);
    if (t == "none") return is_none(subject);
    if (t == "true") return std::holds_alternative<bool>(subject.v) && std::get<bool>(subject.v);
    if (t == "false") return std::holds_alternative<bool>(subject.v) && !std::get<bool>(subject.v);
    if (t == "boolean") return std::holds_alternative<bool>(subject.v);
    if (t == "string") return as_string(subject) != nullptr;
    if (t == "number" || t == "integer") return as_int(subject) != nullptr;
    if (t == "mapping") return as_dict(subject) != nullptr;
    if (t == "sequence" || t == "iterable")
      return as_list(subject) != nullptr || as_string(subject) != nullptr || as_dict(subject) != nullptr;
    if (t == "equalto" || t == "eq" || t == "sameas") return equals(subject, arg(args, 0, e));
    if (t == "odd" || t == "even") return (need_int(subject, e.line, t) % 2 != 0) == (t == "odd");
    unsupported(e.line, fmt::format("the test '{}'", t));
  }

  Value call(const Expr& e) {
    const std::vector<Value> args = eval_args(e, 1);
    if (!e.args[0]) {
      if (e.name == "raise_exception") {
        throw InputError(kJinjaComponent, fmt::format("the chat template refuses this conversation: {}",
                                                 to_str(arg(args, 0, e))));
      }
      if (e.name == "range") {
        int64_t begin = 0, end = 0, step = 1;
        if (args.size() == 1) {
          end = need_int(args[0], e.line, "range");
        } else if (args.size() >= 2) {
          begin = need_int(args[0], e.line, "range");
          end = need_int(args[1], e.line, "range");
          if (args.size() == 3) step = need_int(args[2], e.line, "range");
        }
        if (step == 0) fail(e.line, "range() step cannot be zero");
        List out;
        for (int64_t i = begin; step > 0 ? i < end : i > end; i += step) out.emplace_back(i);
        return Value(std::move(out));
      }
      if (e.name == "namespace") {
        Dict ns;
        for (const auto& [k, v] : e.kwargs) dict_set(ns, k, eval(*v));
        return Value(std::move(ns));
      }
      const Value callee = lookup(e.name);
      if (is_undefined(callee)) fail(e.line, fmt::format("'{}' is undefined and cannot be called", e.name));
      unsupported(e.line, fmt::format("calling '{}'", e.name));
    }
    const Value subject = eval(*e.args[0]);
    if (const std::string* s = as_string(subject)) return string_method(e.name, *s, args, e);
    if (const Dict* d = as_dict(subject)) {
      if (e.name == "items" || e.name == "keys" || e.name == "values") {
        List out;
        for (const auto& [k, v] : *d) {
          if (e.name == "items") out.emplace_back(List{Value(k), v});
          if (e.name == "keys") out.emplace_back(k);
          if (e.name == "values") out.push_back(v);
        }
        return Value(std::move(out));
      }
      if (e.name == "get") {
        const Value* v = dict_find(*d, need_str(arg(args, 0, e), e.line, "get"));
        return v ? *v : (args.size() > 1 ? args[1] : Value(None{}));
      }
    }
    unsupported(e.line, fmt::format("the method '{}' on a {}", e.name, type_name(subject)));
  }

  static Value string_method(const std::string& m, const std::string& s, const std::vector<Value>& args,
                             const Expr& e) {
    auto is_space = [](char c) { return is_ws(c); };
    auto chars_arg = [&]() -> std::optional<std::string> {
      if (args.empty() || is_none(args[0])) return std::nullopt;
      return need_str(args[0], e.line, m);
    };
    if (m == "strip" || m == "lstrip" || m == "rstrip") {
      const auto chars = chars_arg();
      if (!chars && m == "strip") return Value(std::string(python_strip(s)));
      auto strip_char = [&](char c) { return chars ? chars->find(c) != std::string::npos : is_space(c); };
      size_t begin = 0, end = s.size();
      if (m != "rstrip")
        while (begin < end && strip_char(s[begin])) ++begin;
      if (m != "lstrip")
        while (end > begin && strip_char(s[end - 1])) --end;
      return Value(s.substr(begin, end - begin));
    }
    if (m == "upper" || m == "lower") {
      std::string out = s;
      for (char& c : out) c = static_cast<char>(m == "upper" ? std::toupper(static_cast<unsigned char>(c))
                                                             : std::tolower(static_cast<unsigned char>(c)));
      return Value(std::move(out));
    }
    if (m == "title" || m == "capitalize") {
      std::string out = s;
      bool start = true;
      for (size_t i = 0; i < out.size(); ++i) {
        const auto c = static_cast<unsigned char>(out[i]);
        const bool letter = std::isalpha(c) != 0;
        if (m == "title") {
          out[i] = static_cast<char>(letter ? (start ? std::toupper(c) : std::tolower(c)) : c);
          start = !letter;
        } else {
          out[i] = static_cast<char>(i == 0 ? std::toupper(c) : std::tolower(c));
        }
      }
      return Value(std::move(out));
    }
    if (m == "startswith") return Value(s.starts_with(need_str(arg(args, 0, e), e.line, m)));
    if (m == "endswith") return Value(s.ends_with(need_str(arg(args, 0, e), e.line, m)));
    if (m == "replace") {
      const std::string from = need_str(arg(args, 0, e), e.line, m), to = need_str(arg(args, 1, e), e.line, m);
      if (from.empty()) unsupported(e.line, "replace() of an empty string");
      std::string out;
      size_t at = 0;
      for (size_t hit = s.find(from); hit != std::string::npos; hit = s.find(from, at)) {
        out += s.substr(at, hit - at) + to;
        at = hit + from.size();
      }
      return Value(out + s.substr(at));
    }
    if (m == "split") {
      List parts;
      const auto sep = chars_arg();
      if (!sep) {
        size_t i = 0;
        while (i < s.size()) {
          while (i < s.size() && is_space(s[i])) ++i;
          size_t j = i;
          while (j < s.size() && !is_space(s[j])) ++j;
          if (j > i) parts.emplace_back(s.substr(i, j - i));
          i = j;
        }
      } else {
        if (sep->empty()) fail(e.line, "split() with an empty separator");
        size_t at = 0;
        for (size_t hit = s.find(*sep); hit != std::string::npos; hit = s.find(*sep, at)) {
          parts.emplace_back(s.substr(at, hit - at));
          at = hit + sep->size();
        }
        parts.emplace_back(s.substr(at));
      }
      return Value(std::move(parts));
    }
    unsupported(e.line, fmt::format("the string method '{}'", m));
  }

  std::vector<Dict> scopes_;
};

}  // namespace

Template::Template(std::string_view source) : body_(StatementParser(lex(source)).parse_all()) {}
Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const Dict& globals) const {
  std::string out;
  Renderer(globals).run(body_, out);
  return out;
}

}  // namespace flotilla::data::jinja
