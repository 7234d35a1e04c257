// Helpers shared by the data tests: a per-test temporary folder, error capture, the byte
// tokenizer and a ChatML template.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/data/chat_template.hpp"
#include "flotilla/text/byte_tokenizer.hpp"
#include "../test_errors.hpp"
#include "../temp_dir.hpp"

namespace flotilla::data::test_util {

namespace fs = std::filesystem;

// A fresh folder per test, removed afterwards.
using ::flotilla::testing::TempDir;

inline std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

using ::flotilla::testing::input_error_of;

inline const text::ByteTokenizer kBytes;
constexpr int32_t kBos = text::ByteTokenizer::kBos;
constexpr int32_t kEos = text::ByteTokenizer::kEos;

inline ChatTemplate chatml() {
  ChatTemplate t;
  t.family = ChatFamily::chatml;
  return t;
}

}  // namespace flotilla::data::test_util
