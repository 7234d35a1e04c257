// Output directories written whole or not at all: the files go into a staging directory
// next to the target and are moved into place only when everything is written, so a
// failed convert / fuse / init leaves no half model and never touches what was there.
#include <unistd.h>

#include <fmt/format.h>

#include <filesystem>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"

namespace flotilla::cli {

void write_output_dir(const std::string& dir, bool force, const std::function<void(const std::filesystem::path&)>& fill) {
  namespace fs = std::filesystem;
  fs::path out = fs::absolute(dir).lexically_normal();
  if (out.filename().empty()) out = out.parent_path();  // "out/" names the directory "out"
  const bool existed = fs::exists(out);
  if (existed) {
    if (!fs::is_directory(out)) throw InputError("cli", dir + ": exists and is not a directory");
    if (!fs::is_empty(out) && !force)
      throw InputError("cli", dir + ": directory is not empty (pass --force to write into it)");
  }
  fs::create_directories(out.parent_path());
  const fs::path stage = out.parent_path() / fmt::format(".{}.partial-{}", out.filename().string(), getpid());
  fs::remove_all(stage);
  fs::create_directory(stage);
  try {
    fill(stage);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(stage, ec);
    throw;
  }
  if (existed && !fs::is_empty(out)) {
    // --force into a non-empty directory: replace file by file (each rename is atomic).
    for (const auto& e : fs::directory_iterator(stage)) fs::rename(e.path(), out / e.path().filename());
    fs::remove(stage);
  } else {
    if (existed) fs::remove(out);
    fs::rename(stage, out);
  }
}

}  // namespace flotilla::cli
