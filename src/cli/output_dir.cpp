#include <filesystem>

#include "cli/commands.hpp"
#include "flotilla/base/error.hpp"

namespace flotilla::cli {

void check_output_dir(const std::string& dir, bool force) {
  namespace fs = std::filesystem;
  if (fs::exists(dir)) {
    if (!fs::is_directory(dir)) throw InputError("cli", dir + ": exists and is not a directory");
    if (!fs::is_empty(dir) && !force)
      throw InputError("cli", dir + ": directory is not empty (pass --force to write into it)");
  }
}

void ensure_output_dir(const std::string& dir, bool force) {
  check_output_dir(dir, force);
  std::filesystem::create_directories(dir);
}

}  // namespace flotilla::cli
