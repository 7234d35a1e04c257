// FNV-1a, 64-bit: a digest that is the same on every machine and build (std::hash need not
// be), for fingerprints (tokenizers, model configs) and for telling hosts apart.
#pragma once

#include <cstdint>
#include <string_view>

namespace flotilla {

constexpr uint64_t kFnv1a64Offset = 0xcbf29ce484222325ull;

// `hash` continues an earlier digest, so several pieces hash as their concatenation.
constexpr uint64_t fnv1a64(std::string_view bytes, uint64_t hash = kFnv1a64Offset) {
  for (const char c : bytes) hash = (hash ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  return hash;
}

}  // namespace flotilla
