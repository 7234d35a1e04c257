// A timeline of named spans on named threads, written as a Chrome trace (the JSON array
// format that chrome://tracing and Perfetto open): where a training step's time goes,
// and which communication overlaps which computation.
//
//   TraceRecorder trace;
//   { TraceSpan s(&trace, "forward", TraceLane::compute); ... }
//   trace.write("step.json");
//
// Recording is thread-safe; a null recorder records nothing, so call sites need no branch.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

namespace flotilla {

enum class TraceLane : int { compute = 1, communication = 2 };

class TraceRecorder {
 public:
  TraceRecorder();
  // A finished span [start, end) on `lane`, with optional arguments (a JSON object text).
  void add(std::string name, TraceLane lane, std::chrono::steady_clock::time_point start,
           std::chrono::steady_clock::time_point end, std::string args_json = {});
  size_t size() const;
  // Writes the events (and names for the lanes) atomically; `rank` becomes the process id.
  void write(const std::filesystem::path& path, int rank = 0) const;

 private:
  struct Event {
    std::string name, args;
    TraceLane lane;
    int64_t start_us, duration_us;
  };
  std::chrono::steady_clock::time_point origin_;
  mutable std::mutex mutex_;
  std::vector<Event> events_;
};

// Records [construction, destruction) as one span when `recorder` is not null.
class TraceSpan {
 public:
  TraceSpan(TraceRecorder* recorder, std::string name, TraceLane lane, std::string args_json = {})
      : recorder_(recorder), name_(std::move(name)), args_(std::move(args_json)), lane_(lane),
        start_(std::chrono::steady_clock::now()) {}
  ~TraceSpan() {
    if (recorder_) recorder_->add(std::move(name_), lane_, start_, std::chrono::steady_clock::now(), std::move(args_));
  }
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

 private:
  TraceRecorder* recorder_;
  std::string name_, args_;
  TraceLane lane_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace flotilla
