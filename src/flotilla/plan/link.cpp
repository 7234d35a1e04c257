#include "flotilla/plan/link.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <string>

#include "flotilla/base/error.hpp"
#include "flotilla/comm/wire_bytes.hpp"

namespace flotilla::plan {
namespace {

struct Unit {
  std::string_view name;
  double factor;  // to bytes per second (bandwidth) or seconds (latency)
};

// The number at the front of `text` and the rest, lower-cased and without spaces.
bool split_number(std::string_view text, double& value, std::string& unit) {
  std::string s;
  for (const char c : text)
    if (!std::isspace(static_cast<unsigned char>(c))) s.push_back(c);
  if (s.empty()) return false;
  const char* end = s.data() + s.size();
  const auto [ptr, ec] = std::from_chars(s.data(), end, value);
  if (ec != std::errc() || ptr == s.data()) return false;
  unit.assign(ptr, end);
  // Units are compared lower-cased, so "Mb" and "MB" both read as megabytes: bits are
  // only ever the spelled-out "bit"/"bps" forms, which cannot be mistaken.
  return std::isfinite(value);
}

}  // namespace

double parse_bandwidth(std::string_view text, std::string_view flag) {
  static constexpr Unit kUnits[] = {
      {"", 1.0},          {"b/s", 1.0},     {"b", 1.0},       {"bytes/s", 1.0},
      {"kb/s", 1e3},      {"kb", 1e3},      {"mb/s", 1e6},    {"mb", 1e6},
      {"gb/s", 1e9},      {"gb", 1e9},      {"tb/s", 1e12},   {"tb", 1e12},
      {"bit", 1.0 / 8},   {"bit/s", 1.0 / 8}, {"bps", 1.0 / 8},
      {"kbit", 1e3 / 8},  {"kbit/s", 1e3 / 8}, {"kbps", 1e3 / 8},
      {"mbit", 1e6 / 8},  {"mbit/s", 1e6 / 8}, {"mbps", 1e6 / 8},
      {"gbit", 1e9 / 8},  {"gbit/s", 1e9 / 8}, {"gbps", 1e9 / 8},
      {"tbit", 1e12 / 8}, {"tbit/s", 1e12 / 8}, {"tbps", 1e12 / 8},
  };
  double value = 0;
  std::string unit;
  if (split_number(text, value, unit)) {
    std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
    for (const Unit& u : kUnits) {
      if (u.name == unit) {
        if (!(value > 0)) break;
        return value * u.factor;
      }
    }
  }
  throw InputError("plan", fmt::format("{} '{}': not a bandwidth; write e.g. 1gbit, 10gbit, 100mbit or 1.25GB/s",
                                       flag, text));
}

double parse_latency(std::string_view text, std::string_view flag) {
  static constexpr Unit kUnits[] = {{"", 1.0}, {"s", 1.0}, {"ms", 1e-3}, {"us", 1e-6}, {"ns", 1e-9}};
  double value = 0;
  std::string unit;
  if (split_number(text, value, unit)) {
    std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
    for (const Unit& u : kUnits)
      if (u.name == unit && value >= 0) return value * u.factor;
  }
  throw InputError("plan", fmt::format("{} '{}': not a latency; write e.g. 50us, 0.2ms or 1ms", flag, text));
}

std::string format_bandwidth(double bytes_per_s) {
  const double bits = bytes_per_s * 8;
  const std::string b = bits >= 1e9 ? fmt::format("{:.3g} Gbit/s", bits / 1e9) : fmt::format("{:.3g} Mbit/s", bits / 1e6);
  const std::string B = bytes_per_s >= 1e9 ? fmt::format("{:.3g} GB/s", bytes_per_s / 1e9)
                                           : fmt::format("{:.3g} MB/s", bytes_per_s / 1e6);
  return b + " (" + B + ")";
}

std::string format_seconds(double s) {
  if (!std::isfinite(s)) return "inf";
  if (s >= 2 * 3600.0) return fmt::format("{:.1f} h", s / 3600);
  if (s >= 120.0) return fmt::format("{:.1f} min", s / 60);
  if (s >= 1.0) return fmt::format("{:.2f} s", s);
  if (s >= 1e-3) return fmt::format("{:.2f} ms", s * 1e3);
  return fmt::format("{:.1f} us", s * 1e6);
}

std::string format_bytes(double bytes) {
  static constexpr const char* kNames[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (bytes >= 1024.0 && i < 4) bytes /= 1024.0, ++i;
  return i == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, kNames[i]);
}

double ring_all_reduce_s(double payload_bytes, int ranks, const Link& link) {
  if (ranks <= 1) return 0.0;
  return comm::all_reduce_wire_fraction(ranks) * payload_bytes / link.bandwidth_bytes_per_s +
         comm::all_reduce_ring_steps(ranks) * link.latency_s;
}

double ring_reduce_scatter_s(double payload_bytes, int ranks, const Link& link) {
  if (ranks <= 1) return 0.0;
  return comm::scatter_gather_wire_fraction(ranks) * payload_bytes / link.bandwidth_bytes_per_s +
         comm::scatter_gather_ring_steps(ranks) * link.latency_s;
}

double ring_all_gather_s(double payload_bytes, int ranks, const Link& link) {
  return ring_reduce_scatter_s(payload_bytes, ranks, link);
}

double ring_collectives_s(double wire_bytes, double collectives, double steps, const Link& link) {
  return wire_bytes / link.bandwidth_bytes_per_s + collectives * (steps + 1.0) * link.latency_s;
}

double ring_all_reduce_wire_bytes(double payload_bytes, int ranks) {
  return comm::all_reduce_wire_fraction(ranks) * payload_bytes;
}

}  // namespace flotilla::plan
