// Helpers for the Hugging Face tokenizer tests: temporary folders, shell commands, and the
// small tokenizers that tests/text/hf_reference/make_tokenizers.py trains on the sample
// corpus (once per test process).
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "../temp_dir.hpp"

namespace flotilla::text::hf_test {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed when it goes out of scope.
using ::flotilla::testing::TempDir;

inline void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (const char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// Runs `command` with stdout and stderr into `log`; returns its exit status (-1 if it did
// not exit normally).
inline int run_command(const std::string& command, const fs::path& log) {
  const int status = std::system((command + " > " + shell_quote(log.string()) + " 2>&1").c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline bool have_command(const std::string& name) {
  return std::system(("command -v " + name + " > /dev/null 2>&1").c_str()) == 0;
}

inline fs::path source_dir() { return FLOTILLA_SOURCE_DIR; }
// The build folder: the flotilla binary sits at its top.
inline fs::path build_dir() { return fs::path(FLOTILLA_BINARY).parent_path(); }

// Folder with byte_llama3/, byte_qwen2/, byte_gpt2/, byte_gpt2_prefix/, sp_llama2/,
// sp_metaspace/ (see make_tokenizers.py), trained on the first call; empty path and a
// failure recorded when python3 cannot make them.
inline const fs::path& trained_tokenizers() {
  static const TempDir dir("trained_tokenizers");
  static const bool made = [] {
    const fs::path script = source_dir() / "tests/text/hf_reference/make_tokenizers.py";
    const fs::path corpus = source_dir() / "data/sample/corpus.txt";
    const std::string command = "python3 " + shell_quote(script.string()) + " --corpus " +
                                shell_quote(corpus.string()) + " --out " + shell_quote(dir.path().string());
    const fs::path log = dir / "make_tokenizers.log";
    if (run_command(command, log) != 0) {
      ADD_FAILURE() << "make_tokenizers.py failed: " << command << "\n" << read_file(log);
      return false;
    }
    return true;
  }();
  static const fs::path none;
  return made ? dir.path() : none;
}

}  // namespace flotilla::text::hf_test
