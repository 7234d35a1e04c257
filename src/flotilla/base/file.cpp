#include "flotilla/base/file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla {
namespace {
constexpr std::string_view kFileComponent = "base/file";

std::string sys_message(const std::filesystem::path& path, std::string_view what) {
  return path.string() + ": " + std::string(what) + ": " + std::strerror(errno);
}

// What a path that is not a regular file is instead, in the user's words.
std::string_view kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

// Opens `path` for reading, refusing anything but a regular file. O_NONBLOCK so that a FIFO
// is refused at once instead of blocking in open() until a writer appears; the stat before
// the open keeps a device from being opened at all.
int open_regular_file(const std::filesystem::path& path, struct stat& st) {
  if (::stat(path.c_str(), &st) != 0) throw InputError(kFileComponent, sys_message(path, "cannot open"));
  if (!S_ISREG(st.st_mode))
    throw InputError(kFileComponent, fmt::format("{}: is {}, expected a file", path.string(), kind_of(st.st_mode)));
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw InputError(kFileComponent, sys_message(path, "cannot open"));
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {  // replaced between stat and open
    ::close(fd);
    throw InputError(kFileComponent, path.string() + ": changed while being opened; not a regular file");
  }
  return fd;
}

void fsync_dir(const std::filesystem::path& dir) {
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd < 0) return;  // Not fatal: some filesystems refuse to open directories.
  ::fsync(dfd);
  ::close(dfd);
}
}  // namespace

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  struct stat st {};
  const int fd = open_regular_file(path, st);
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data_ == MAP_FAILED) {
      data_ = nullptr;
      ::close(fd);
      throw Error(kFileComponent, sys_message(path, "mmap failed"));
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
  struct stat st {};
  const int fd = open_regular_file(path, st);
  std::string text;
  try {
    text.resize(static_cast<size_t>(st.st_size));
  } catch (const std::bad_alloc&) {
    ::close(fd);
    throw InputError(kFileComponent, fmt::format("{}: {} bytes do not fit in this machine's memory", path.string(),
                                             static_cast<int64_t>(st.st_size)));
  } catch (const std::length_error&) {
    ::close(fd);
    throw InputError(kFileComponent, fmt::format("{}: {} bytes do not fit in this machine's memory", path.string(),
                                             static_cast<int64_t>(st.st_size)));
  }
  // The size from fstat; a file that shrinks meanwhile reads short, one that grows is cut.
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string msg = sys_message(path, "read failed");
      ::close(fd);
      throw InputError(kFileComponent, msg);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  text.resize(done);
  return text;
}

uint64_t read_file_chunks(const std::filesystem::path& path, size_t chunk_bytes,
                          const std::function<void(std::span<const std::byte>)>& consume) {
  if (chunk_bytes == 0) throw Error(kFileComponent, "read_file_chunks needs a chunk of at least one byte");
  struct stat st {};
  const int fd = open_regular_file(path, st);
  struct CloseOnExit {
    int fd;
    ~CloseOnExit() { ::close(fd); }
  } closer{fd};
  std::vector<std::byte> chunk(chunk_bytes);
  uint64_t total = 0;
  // A chunk is handed on only once full (or at the end of the file): short reads of a
  // pipe-backed filesystem never change the pieces `consume` sees.
  size_t filled = 0;
  for (;;) {
    const ssize_t n = ::read(fd, chunk.data() + filled, chunk.size() - filled);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw InputError(kFileComponent, sys_message(path, "read failed"));
    }
    filled += static_cast<size_t>(n);
    if (n == 0 || filled == chunk.size()) {
      if (filled > 0) consume(std::span<const std::byte>(chunk.data(), filled));
      total += filled;
      filled = 0;
      if (n == 0) break;
    }
  }
  return total;
}

AtomicFileWriter::AtomicFileWriter(std::filesystem::path path) : path_(std::move(path)) {
  tmp_path_ = path_;
  tmp_path_ += ".tmp." + std::to_string(::getpid());
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(kFileComponent, sys_message(tmp_path_, "cannot create"));
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
      throw Error(kFileComponent, sys_message(tmp_path_, "write failed"));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::write(std::string_view text) {
  write(std::span<const std::byte>(reinterpret_cast<const std::byte*>(text.data()), text.size()));
}

void AtomicFileWriter::commit() {
  if (::fsync(fd_) != 0) throw Error(kFileComponent, sys_message(tmp_path_, "fsync failed"));
  if (::close(fd_) != 0) {
    fd_ = -1;
    ::unlink(tmp_path_.c_str());
    throw Error(kFileComponent, sys_message(tmp_path_, "close failed"));
  }
  fd_ = -1;
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const std::string msg = sys_message(path_, "rename failed");
    ::unlink(tmp_path_.c_str());
    throw Error(kFileComponent, msg);
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
