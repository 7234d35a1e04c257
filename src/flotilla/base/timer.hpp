#pragma once

#include <algorithm>
#include <chrono>
#include <functional>

namespace flotilla {

// Monotonic wall-clock stopwatch.
class Timer {
 public:
  Timer() : start_(std::chrono::steady_clock::now()) {}
  void reset() { start_ = std::chrono::steady_clock::now(); }
  double elapsed_s() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  double elapsed_ms() const { return elapsed_s() * 1e3; }

 private:
  std::chrono::steady_clock::time_point start_;
};

// The best of `repeats` timed calls of fn, in ms, after one untimed call (warm caches and
// pages): what a micro-benchmark of a kernel reports.
inline double best_of_ms(int repeats, const std::function<void()>& fn) {
  fn();
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    Timer t;
    fn();
    best = std::min(best, t.elapsed_ms());
  }
  return best;
}

}  // namespace flotilla
