// Reading files names the path and what is wrong with it: a directory, a FIFO or a device
// where a file is expected is refused at once (a FIFO without waiting for a writer).
#include "flotilla/base/file.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include "flotilla/base/error.hpp"
#include "../test_errors.hpp"
#include "../temp_dir.hpp"

namespace flotilla {
namespace {

using ::flotilla::testing::input_error_of;

using ::flotilla::testing::TempDir;

TEST(ReadTextFile, ReadsARegularFileWhole) {
  TempDir tmp;
  std::ofstream(tmp / "a.txt") << "line one\nline two\n";
  EXPECT_EQ(read_text_file(tmp / "a.txt"), "line one\nline two\n");
  std::ofstream(tmp / "empty.txt").close();
  EXPECT_EQ(read_text_file(tmp / "empty.txt"), "");
}

TEST(ReadTextFile, ADirectoryIsNamedAsOne) {
  TempDir tmp;
  std::filesystem::create_directory(tmp / "config.json");
  const std::string msg = input_error_of([&] { (void)read_text_file(tmp / "config.json"); });
  EXPECT_NE(msg.find("config.json: is a directory, expected a file"), std::string::npos) << msg;
  const std::string mapped = input_error_of([&] { MappedFile m(tmp / "config.json"); });
  EXPECT_NE(mapped.find("is a directory"), std::string::npos) << mapped;
}

TEST(ReadTextFile, AFifoIsRefusedWithoutWaitingForAWriter) {
  TempDir tmp;
  ASSERT_EQ(::mkfifo((tmp / "pipe").c_str(), 0600), 0);
  const auto start = std::chrono::steady_clock::now();
  const std::string msg = input_error_of([&] { (void)read_text_file(tmp / "pipe"); });
  EXPECT_NE(msg.find("pipe: is a FIFO (named pipe), expected a file"), std::string::npos) << msg;
  const std::string mapped = input_error_of([&] { MappedFile m(tmp / "pipe"); });
  EXPECT_NE(mapped.find("FIFO"), std::string::npos) << mapped;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(ReadTextFile, ACharacterDeviceIsRefusedInsteadOfReadForever) {
  // /dev/zero never ends: reading it whole would exhaust memory.
  const std::string msg = input_error_of([] { (void)read_text_file("/dev/zero"); });
  EXPECT_NE(msg.find("/dev/zero: is a character device, expected a file"), std::string::npos) << msg;
}

TEST(ReadTextFile, AMissingFileIsNamed) {
  TempDir tmp;
  const std::string msg = input_error_of([&] { (void)read_text_file(tmp / "absent.json"); });
  EXPECT_NE(msg.find("absent.json: cannot open"), std::string::npos) << msg;
}

}  // namespace
}  // namespace flotilla
