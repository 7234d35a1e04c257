#include "flotilla/tensor/dtype.hpp"

#include <array>

#include "flotilla/base/error.hpp"

namespace flotilla {
namespace {
struct DTypeInfo {
  DType dt;
  std::string_view name;
  size_t size;
};
constexpr std::array<DTypeInfo, 8> kInfo{{{DType::f32, "F32", 4},
                                          {DType::f16, "F16", 2},
                                          {DType::bf16, "BF16", 2},
                                          {DType::i32, "I32", 4},
                                          {DType::u32, "U32", 4},
                                          {DType::i64, "I64", 8},
                                          {DType::u8, "U8", 1},
                                          {DType::i8, "I8", 1}}};
}  // namespace

size_t dtype_size(DType dt) { return kInfo[static_cast<size_t>(dt)].size; }
std::string_view dtype_name(DType dt) { return kInfo[static_cast<size_t>(dt)].name; }

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& info : kInfo)
    if (info.name == name) return info.dt;
  return std::nullopt;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;                 // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;                // overflow -> inf
  if (abs < 0x38800000u) {                                      // subnormal or zero
    if (abs < 0x33000000u) return sign;                         // rounds to 0
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                             // 14..24
    uint32_t half = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t h = ((abs >> 13) - ((127 - 15) << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

void convert_to_f32(DType dt, const std::byte* src, std::span<float> dst) {
  const size_t n = dst.size();
  if (n == 0) return;  // an empty span's data() may be null, which memcpy must never get
  switch (dt) {
    case DType::f32:
      std::memcpy(dst.data(), src, n * 4);
      return;
    case DType::f16:
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    case DType::bf16:
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    default:
      throw Error("tensor/dtype", "cannot convert " + std::string(dtype_name(dt)) + " to F32");
  }
}

}  // namespace flotilla
