// Helpers shared by the io tests: a per-test temporary directory and a writer of
// hand-crafted (possibly corrupt) safetensors files.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../temp_dir.hpp"

namespace flotilla::io::test_util {

// A fresh directory under the system temp dir, removed when the test ends.
using ::flotilla::testing::TempDir;

inline void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// 8-byte length (the header's own unless `declared_length` overrides it), header, data.
inline void write_raw_safetensors(const std::filesystem::path& path, const std::string& header,
                                  const std::string& data,
                                  std::optional<uint64_t> declared_length = std::nullopt) {
  const uint64_t n = declared_length.value_or(header.size());
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &n, 8);
  write_bytes(path, bytes + header + data);
}

// Random floats in [-2, 2) from a seed the test logs.
inline std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

inline uint32_t fresh_seed() {
  const uint32_t seed = std::random_device{}();
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  std::printf("seed %u\n", seed);
  return seed;
}

}  // namespace flotilla::io::test_util
