// Shared by the unit tests: a folder of the test's own under the system's temp directory.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

namespace flotilla::testing {

// flotilla_<suite>_<test>[_<tag>]_<pid> under the temp directory: created empty (whatever
// an earlier run left there is removed first) and removed with its contents at the end.
class TempDir {
 public:
  TempDir() : TempDir(std::string()) {}
  explicit TempDir(const std::string& tag) {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = "flotilla";
    if (info != nullptr) name += std::string("_") + info->test_suite_name() + "_" + info->name();
    if (!tag.empty()) name += "_" + tag;
    for (char& c : name)
      if (c == '/') c = '_';  // parameterised tests' names hold '/'
    path_ = std::filesystem::temp_directory_path() / (name + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

  // Writes `content` to `name` inside (creating its folders) and returns its path.
  std::filesystem::path file(const std::string& name, const std::string& content) const {
    const std::filesystem::path p = path_ / name;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }

 private:
  std::filesystem::path path_;
};

// Writes `text` to `path` as it is (binary).
inline void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

}  // namespace flotilla::testing
