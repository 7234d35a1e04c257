// Files: read-only memory maps and atomic writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <string_view>

namespace flotilla {

// A read-only mmap of a whole file (RAII). An empty file maps to an empty span. A path that
// is not a regular file (a directory, a FIFO, a device) is an InputError saying what it is.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const std::byte> bytes() const { return {static_cast<const std::byte*>(data_), size_}; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void release();
  void* data_ = nullptr;
  size_t size_ = 0;
  std::filesystem::path path_;
};

// Whole file into a string; InputError naming the file when it cannot be read, when it is
// not a regular file ("is a directory, expected a file"; a FIFO is refused without waiting
// for a writer), or when it does not fit in memory.
std::string read_text_file(const std::filesystem::path& path);

// Reads a regular file front to back in pieces of at most `chunk_bytes` (> 0), handing each
// to `consume` in order, and returns the bytes read: memory stays bounded whatever the
// file's size. Refuses what MappedFile refuses, in the same words; a read error is an
// InputError naming the file.
uint64_t read_file_chunks(const std::filesystem::path& path, size_t chunk_bytes,
                          const std::function<void(std::span<const std::byte>)>& consume);

// Writes `data` to `path` atomically: a temporary file in the same directory, fsync,
// rename over `path`, fsync of the directory. A crash leaves either the old file or the
// new one, never a torn one.
void write_file_atomic(const std::filesystem::path& path, std::span<const std::byte> data);
void write_file_atomic(const std::filesystem::path& path, std::string_view text);

// Streaming variant for large outputs: write() pieces, then commit() renames into place.
// Destroyed without commit(), the temporary file is removed and `path` is untouched.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  void write(std::span<const std::byte> data);
  void write(std::string_view text);
  void commit();

 private:
  std::filesystem::path path_;
  std::filesystem::path tmp_path_;
  int fd_ = -1;
};

}  // namespace flotilla
