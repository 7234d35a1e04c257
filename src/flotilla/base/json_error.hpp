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

}  // namespace flotilla
