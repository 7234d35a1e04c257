// f16 / bf16 <-> f32 conversions of tensor/dtype: exhaustive round trips over all 65536 bit
// patterns and round-to-nearest-even at every midpoint between neighbouring values.
// (Lives with the kernel tests because the kernels consume these conversions.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/tensor/dtype.hpp"

namespace flotilla {
namespace {

bool f16_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool bf16_is_nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }
float up(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }
float down(float x) { return std::nextafter(x, -std::numeric_limits<float>::infinity()); }

TEST(DType, F16RoundTripsEveryBitPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(static_cast<uint16_t>(h));
    if (f16_is_nan(static_cast<uint16_t>(h))) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_TRUE(f16_is_nan(f32_to_f16(f))) << std::hex << h;
    } else {
      ASSERT_EQ(f32_to_f16(f), h) << std::hex << h << " -> " << f;
    }
  }
}

TEST(DType, F16KnownValues) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);                    // overflow -> inf
  EXPECT_EQ(f32_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -26)), 0x0000);   // below half the smallest subnormal
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
}

TEST(DType, F32ToF16RoundsToNearestEvenAtEveryMidpoint) {
  // Between every pair of neighbouring finite f16 values (subnormals included, and from the
  // largest finite value towards infinity): the exact midpoint goes to the even neighbour,
  // one float ulp either side goes to the nearer one. Both signs.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float a = f16_to_f32(static_cast<uint16_t>(h));
    const float b = h + 1 < 0x7c00 ? f16_to_f32(static_cast<uint16_t>(h + 1)) : 65536.0f;
    const float mid = (a + b) / 2;  // exact: f16 has 11 significant bits, f32 has 24
    const uint16_t even = static_cast<uint16_t>((h & 1u) ? h + 1 : h);
    for (uint16_t sign : {uint16_t{0}, uint16_t{0x8000}}) {
      const float s = sign ? -1.0f : 1.0f;
      ASSERT_EQ(f32_to_f16(s * mid), even | sign) << std::hex << h;
      ASSERT_EQ(f32_to_f16(s * down(mid)), h | sign) << std::hex << h;
      ASSERT_EQ(f32_to_f16(s * up(mid)), (h + 1) | sign) << std::hex << h;
    }
  }
}

TEST(DType, Bf16RoundTripsEveryBitPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(static_cast<uint16_t>(h));
    if (bf16_is_nan(static_cast<uint16_t>(h))) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_TRUE(bf16_is_nan(f32_to_bf16(f))) << std::hex << h;
    } else {
      ASSERT_EQ(f32_to_bf16(f), h) << std::hex << h;
    }
  }
}

TEST(DType, F32ToBf16RoundsToNearestEvenAtEveryMidpoint) {
  for (uint32_t h = 0; h < 0x7f80; ++h) {
    // Midpoint bit pattern: the bf16 value with the next lower f32 bit set (exact in f32).
    uint32_t mid_bits = (h << 16) | 0x8000u;
    float mid;
    std::memcpy(&mid, &mid_bits, 4);
    const uint16_t even = static_cast<uint16_t>((h & 1u) ? h + 1 : h);
    ASSERT_EQ(f32_to_bf16(mid), even) << std::hex << h;
    ASSERT_EQ(f32_to_bf16(down(mid)), h) << std::hex << h;
    if (h + 1 < 0x7f80) ASSERT_EQ(f32_to_bf16(up(mid)), h + 1) << std::hex << h;
    ASSERT_EQ(f32_to_bf16(-mid), even | 0x8000u) << std::hex << h;
  }
  EXPECT_TRUE(bf16_is_nan(f32_to_bf16(std::nanf(""))));
  // A NaN whose payload sits only in the low 16 bits must not truncate to infinity.
  const uint32_t low_payload_nan = 0x7f800001u;
  float f;
  std::memcpy(&f, &low_payload_nan, 4);
  EXPECT_TRUE(bf16_is_nan(f32_to_bf16(f)));
}

TEST(DType, ConvertToF32ReadsLittleEndianAtAnyAlignment) {
  // One byte of offset: the source need not be aligned.
  const uint8_t f16_bytes[] = {0xff, 0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b};  // 1, -2, 65504
  std::vector<float> out(3);
  convert_to_f32(DType::f16, reinterpret_cast<const std::byte*>(f16_bytes + 1), out);
  EXPECT_EQ(out, (std::vector<float>{1.0f, -2.0f, 65504.0f}));
  const uint8_t bf16_bytes[] = {0xff, 0x80, 0x3f, 0x40, 0xc0};  // 1.0, -3.0
  std::vector<float> out2(2);
  convert_to_f32(DType::bf16, reinterpret_cast<const std::byte*>(bf16_bytes + 1), out2);
  EXPECT_EQ(out2, (std::vector<float>{1.0f, -3.0f}));
  std::vector<float> out3(1);
  EXPECT_THROW(convert_to_f32(DType::i32, reinterpret_cast<const std::byte*>(bf16_bytes), out3),
               Error);
}

}  // namespace
}  // namespace flotilla
