#include "flotilla/base/log.hpp"

#include <atomic>
#include <cstdio>

namespace flotilla::log {
namespace {
// The one process-wide setting we allow: where diagnostics go is a property of the
// process, not of any model or communicator.
std::atomic<Level> g_level{Level::info};
}  // namespace

void set_level(Level level) { g_level.store(level); }
Level level() { return g_level.load(); }

void write(Level lvl, std::string_view message) {
  static constexpr const char* kTags[] = {"debug", "info", "warn", "error", ""};
  std::fprintf(stderr, "[%s] %.*s\n", kTags[static_cast<int>(lvl)],
               static_cast<int>(message.size()), message.data());
}

}  // namespace flotilla::log
