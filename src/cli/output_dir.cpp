// Checks of output paths before a command does any work: a run that would fail to write
// its result at the end, or that would write over what the user has or what it reads,
// stops before the first step.
#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"

namespace flotilla::cli {
namespace fs = std::filesystem;
namespace {

// The path with symbolic links and "..", "." resolved as far as it exists: two spellings
// of one place compare equal.
fs::path resolved(const fs::path& p) {
  std::error_code ec;
  fs::path r = fs::weakly_canonical(fs::absolute(p), ec);
  if (ec) r = fs::absolute(p).lexically_normal();
  if (r.filename().empty()) r = r.parent_path();  // "out/" is "out"
  return r;
}

// Whether `inner` is `outer` or lies below it (both resolved).
bool within(const fs::path& inner, const fs::path& outer) {
  const fs::path rel = inner.lexically_relative(outer);
  return !rel.empty() && *rel.begin() != "..";
}

// Creates and removes a probe file in `dir`: the one test of "can I write here" that
// root's permissions, read-only mounts and pseudo-filesystems all answer truthfully.
void check_can_create_in(const fs::path& dir, const std::string& what) {
  const fs::path probe = dir / fmt::format(".flotilla-write-test-{}", ::getpid());
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return;  // a leftover of this very process id: the folder takes files
    throw InputError("cli", fmt::format("{}: cannot write into {}: {}", what, dir.string(), std::strerror(errno)));
  }
  ::close(fd);
  ::unlink(probe.c_str());
}

// The deepest existing folder on the way to `p` (p itself if it is one); InputError when a
// component on the way is an existing file.
fs::path nearest_existing_dir(const fs::path& p, const std::string& what) {
  fs::path dir = fs::absolute(p).lexically_normal();
  if (dir.filename().empty()) dir = dir.parent_path();
  std::error_code ec;
  while (!fs::exists(dir, ec)) {
    if (dir == dir.parent_path()) break;
    dir = dir.parent_path();
  }
  if (!fs::is_directory(dir, ec))
    throw InputError("cli", fmt::format("{}: {} is a file, not a folder", what, dir.string()));
  return dir;
}

}  // namespace

void check_output_dir(const std::string& dir, bool force) {
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (fs::exists(st)) {
    if (!fs::is_directory(st)) throw InputError("cli", dir + ": exists and is not a directory");
    if (!fs::is_empty(dir, ec) && !force)
      throw InputError("cli", dir + ": directory is not empty (pass --force to write into it)");
  }
  check_can_create_in(nearest_existing_dir(dir, dir), dir);
}

void ensure_output_dir(const std::string& dir, bool force) {
  check_output_dir(dir, force);
  std::filesystem::create_directories(dir);
}

void check_output_file(std::string_view flag, const std::filesystem::path& file, bool force) {
  const std::string what = fmt::format("{} {}", flag, file.string());
  std::error_code ec;
  const fs::file_status st = fs::status(file, ec);
  if (fs::is_directory(st)) throw InputError("cli", what + ": is a directory, expected a file name");
  if (fs::exists(st) && !fs::is_regular_file(st))
    throw InputError("cli", what + ": exists and is not a regular file");
  if (fs::exists(st) && !force) throw InputError("cli", what + ": exists (pass --force to replace it)");
  fs::path parent = fs::absolute(file).lexically_normal().parent_path();
  if (!fs::is_directory(parent, ec))
    throw InputError("cli", fmt::format("{}: its folder {} does not exist", what, parent.string()));
  check_can_create_in(parent, what);
}

void check_output_not_input(std::string_view out_flag, const std::filesystem::path& out,
                            std::initializer_list<CommandInput> inputs) {
  const fs::path o = resolved(out);
  for (const CommandInput& in : inputs) {
    if (in.path.empty()) continue;
    const fs::path i = resolved(in.path);
    if (o == i)
      throw InputError("cli", fmt::format("{} {} is the {} this command reads: choose another output", out_flag,
                                          out.string(), in.flag));
    if (within(o, i))
      throw InputError("cli", fmt::format("{} {} is inside {} {}, which this command reads: choose an output outside it",
                                          out_flag, out.string(), in.flag, in.path.string()));
    if (within(i, o))
      throw InputError("cli", fmt::format("{} {} contains {} {}, which this command reads: choose an output that "
                                          "does not hold it",
                                          out_flag, out.string(), in.flag, in.path.string()));
  }
}

}  // namespace flotilla::cli
