#include "flotilla/base/file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "flotilla/base/error.hpp"

namespace flotilla {
namespace {
constexpr std::string_view kComponent = "base/file";

std::string sys_message(const std::filesystem::path& path, std::string_view what) {
  return path.string() + ": " + std::string(what) + ": " + std::strerror(errno);
}

void fsync_dir(const std::filesystem::path& dir) {
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd < 0) return;  // Not fatal: some filesystems refuse to open directories.
  ::fsync(dfd);
  ::close(dfd);
}
}  // namespace

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(kComponent, sys_message(path, "cannot open"));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw InputError(kComponent, sys_message(path, "cannot stat"));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(kComponent, path.string() + ": not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data_ == MAP_FAILED) {
      data_ = nullptr;
      ::close(fd);
      throw Error(kComponent, sys_message(path, "mmap failed"));
    }
  }
  ::close(fd);
}

MappedFile::~MappedFile() { release(); }

MappedFile::MappedFile(MappedFile&& other) noexcept
    : data_(other.data_), size_(other.size_), path_(std::move(other.path_)) {
  other.data_ = nullptr;
  other.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    release();
    data_ = other.data_;
    size_ = other.size_;
    path_ = std::move(other.path_);
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void MappedFile::release() {
  if (data_) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(kComponent, sys_message(path, "cannot open"));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw InputError(kComponent, sys_message(path, "read failed"));
  return ss.str();
}

AtomicFileWriter::AtomicFileWriter(std::filesystem::path path) : path_(std::move(path)) {
  tmp_path_ = path_;
  tmp_path_ += ".tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(kComponent, sys_message(tmp_path_, "cannot create"));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_path_.c_str());
  }
}

void AtomicFileWriter::write(std::span<const std::byte> data) {
  const std::byte* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    const ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(kComponent, sys_message(tmp_path_, "write failed"));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::write(std::string_view text) {
  write(std::span<const std::byte>(reinterpret_cast<const std::byte*>(text.data()), text.size()));
}

void AtomicFileWriter::commit() {
  if (::fsync(fd_) != 0) throw Error(kComponent, sys_message(tmp_path_, "fsync failed"));
  if (::close(fd_) != 0) {
    fd_ = -1;
    ::unlink(tmp_path_.c_str());
    throw Error(kComponent, sys_message(tmp_path_, "close failed"));
  }
  fd_ = -1;
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const std::string msg = sys_message(path_, "rename failed");
    ::unlink(tmp_path_.c_str());
    throw Error(kComponent, msg);
  }
  fsync_dir(path_.parent_path());
}

void write_file_atomic(const std::filesystem::path& path, std::span<const std::byte> data) {
  AtomicFileWriter w(path);
  w.write(data);
  w.commit();
}

void write_file_atomic(const std::filesystem::path& path, std::string_view text) {
  AtomicFileWriter w(path);
  w.write(text);
  w.commit();
}

}  // namespace flotilla
