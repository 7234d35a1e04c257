#include "flotilla/comm/algorithms/all_reduce_bench.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::comm {
namespace {

size_t parse_one_size(std::string_view s, std::string_view whole) {
  size_t unit = 1;
  if (!s.empty()) {
    switch (s.back()) {
      case 'K': case 'k': unit = size_t{1} << 10; break;
      case 'M': case 'm': unit = size_t{1} << 20; break;
      case 'G': case 'g': unit = size_t{1} << 30; break;
      default: break;
    }
    if (unit != 1) s.remove_suffix(1);
  }
  size_t value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || value == 0)
    throw InputError("bench", fmt::format("--sizes '{}': '{}' is not a size like 4K, 1M or 4096",
                                          whole, s));
  return value * unit;
}

}  // namespace

double bus_gbit_s(size_t bytes, int world, double seconds) {
  if (world <= 1 || seconds <= 0) return 0.0;
  return static_cast<double>(bytes) * all_reduce_wire_fraction(world) / seconds * 8e-9;
}

std::vector<size_t> parse_sizes(std::string_view text) {
  std::vector<size_t> sizes;
  if (const size_t dots = text.find(".."); dots != std::string_view::npos) {
    const size_t lo = parse_one_size(text.substr(0, dots), text);
    const size_t hi = parse_one_size(text.substr(dots + 2), text);
    for (size_t s = lo; s <= hi; s *= 2) sizes.push_back(s);
  } else {
    size_t start = 0;
    while (start <= text.size()) {
      const size_t comma = std::min(text.find(',', start), text.size());
      sizes.push_back(parse_one_size(text.substr(start, comma - start), text));
      start = comma + 1;
    }
  }
  if (sizes.empty()) throw InputError("bench", fmt::format("--sizes '{}' lists no size", text));
  return sizes;
}

int default_iters(size_t bytes) {
  return static_cast<int>(std::clamp<size_t>((size_t{128} << 20) / std::max<size_t>(bytes, 1), 3, 200));
}

std::vector<BenchRow> bench_all_reduce(Communicator& comm,
                                       const std::vector<BenchContender>& contenders,
                                       const std::vector<size_t>& sizes, int iters,
                                       const std::function<void(const BenchRow&)>& on_row) {
  using Clock = std::chrono::steady_clock;
  const int n = comm.size();
  const float expected = static_cast<float>(n) * static_cast<float>(n + 1) / 2.0f;
  std::vector<BenchRow> rows;
  for (size_t bytes : sizes) {
    std::vector<float> data(bytes / sizeof(float));  // (bytes / 4)
    BenchRow row;
    row.bytes = data.size() * sizeof(float);
    row.iters = iters > 0 ? iters : default_iters(bytes);
    // First every contender's checked call (which also warms up connections, pages and
    // the kernel's TCP buffers at this size: measured on emulated 1 Gbit/s hosts, the
    // first contender timed after a size change was up to 8% slower without this round),
    // then every contender's timed calls.
    for (const BenchContender& c : contenders) {
      std::fill(data.begin(), data.end(), static_cast<float>(comm.rank() + 1));
      c.run(data);
      std::array<double, 1> wrong = {0.0};
      for (float v : data)
        if (v != expected) wrong[0] = 1.0;
      comm.all_reduce(wrong, ReduceOp::max, {.name = "bench check"});
      if (wrong[0] != 0.0)
        throw InputError("bench", fmt::format("{} gave a wrong sum at {} bytes on {} ranks "
                                              "(rank {}: {})",
                                              c.name, row.bytes, n, comm.rank(),
                                              data.empty() ? 0.0f : data[0]));
    }
    for (const BenchContender& c : contenders) {
      // Zeros keep the timed sums at zero: no overflow, no denormals, whatever `iters`.
      std::fill(data.begin(), data.end(), 0.0f);
      comm.barrier({.name = "bench"});
      const auto start = Clock::now();
      for (int i = 0; i < row.iters; ++i) c.run(data);
      std::array<double, 1> seconds = {
          std::chrono::duration<double>(Clock::now() - start).count() / row.iters};
      comm.all_reduce(seconds, ReduceOp::max, {.name = "bench time"});
      row.seconds.push_back(seconds[0]);
    }
    if (on_row) on_row(row);
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace flotilla::comm
