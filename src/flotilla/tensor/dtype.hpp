// Element types as they appear in files, and conversion to and from float32 (the type
// every kernel computes in).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>

namespace flotilla {

enum class DType : uint8_t { f32, f16, bf16, i32, u32, i64, u8, i8 };

size_t dtype_size(DType dt);
// safetensors spelling: "F32", "F16", "BF16", "I32", "U32", "I64", "U8", "I8".
std::string_view dtype_name(DType dt);
std::optional<DType> parse_dtype(std::string_view name);

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts `count` elements of `src` (in dtype `dt`, little-endian, any alignment) to f32.
// Only floating dtypes are accepted.
void convert_to_f32(DType dt, const std::byte* src, std::span<float> dst);

}  // namespace flotilla
