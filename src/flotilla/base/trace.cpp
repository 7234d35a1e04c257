#include "flotilla/base/trace.hpp"

#include <fmt/format.h>

#include "flotilla/base/file.hpp"

namespace flotilla {

namespace {

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", static_cast<int>(c));
      continue;
    }
    out += c;
  }
  return out;
}

}  // namespace

TraceRecorder::TraceRecorder() : origin_(std::chrono::steady_clock::now()) {}

void TraceRecorder::add(std::string name, TraceLane lane, std::chrono::steady_clock::time_point start,
                        std::chrono::steady_clock::time_point end, std::string args_json) {
  using std::chrono::duration_cast;
  using std::chrono::microseconds;
  Event e{std::move(name), std::move(args_json), lane, duration_cast<microseconds>(start - origin_).count(),
          duration_cast<microseconds>(end - start).count()};
  std::lock_guard lock(mutex_);
  events_.push_back(std::move(e));
}

size_t TraceRecorder::size() const {
  std::lock_guard lock(mutex_);
  return events_.size();
}

void TraceRecorder::write(const std::filesystem::path& path, int rank) const {
  std::string out = "[\n";
  out += fmt::format(R"({{"name":"process_name","ph":"M","pid":{0},"args":{{"name":"rank {0}"}}}})", rank);
  out += fmt::format(",\n" R"({{"name":"thread_name","ph":"M","pid":{},"tid":1,"args":{{"name":"compute"}}}})", rank);
  out += fmt::format(",\n" R"({{"name":"thread_name","ph":"M","pid":{},"tid":2,"args":{{"name":"communication"}}}})",
                     rank);
  std::lock_guard lock(mutex_);
  for (const Event& e : events_) {
    out += fmt::format(",\n" R"({{"name":"{}","ph":"X","pid":{},"tid":{},"ts":{},"dur":{})", json_escape(e.name), rank,
                       static_cast<int>(e.lane), e.start_us, e.duration_us);
    if (!e.args.empty()) out += ",\"args\":" + e.args;
    out += "}";
  }
  out += "\n]\n";
  write_file_atomic(path, out);
}

}  // namespace flotilla
