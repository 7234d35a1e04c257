// nlohmann::json's exception messages start with a tag for programmers,
// "[json.exception.parse_error.101] ": what a user reads is the rest.
#pragma once

#include <exception>
#include <string>
#include <string_view>

namespace flotilla {

// e.what() without a leading "[json.exception.<kind>.<id>] " tag (unchanged otherwise).
inline std::string json_error_text(const std::exception& e) {
  const std::string_view what = e.what();
  const size_t tag_end = what.find("] ");
  if (what.starts_with("[json.exception") && tag_end != std::string_view::npos)
    return std::string(what.substr(tag_end + 2));
  return std::string(what);
}

// What a JSON value is, for an error line: "a number", "an array", ... (a template so that
// this header need not include nlohmann/json.hpp; Json is nlohmann::json).
template <class Json>
std::string_view json_type_name(const Json& j) {
  using T = typename Json::value_t;
  switch (j.type()) {
    case T::null: return "null";
    case T::boolean: return "a boolean";
    case T::number_integer:
    case T::number_unsigned:
    case T::number_float: return "a number";
    case T::string: return "a string";
    case T::array: return "an array";
    case T::object: return "an object";
    default: return "a binary value";
  }
}

}  // namespace flotilla
