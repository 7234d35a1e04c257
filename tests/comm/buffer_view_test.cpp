#include <gtest/gtest.h>

#include <vector>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/error.hpp"
#include "flotilla/comm/buffer_view.hpp"
#include "flotilla/comm/reduce.hpp"

namespace flotilla::comm {
namespace {

TEST(CommBufferView, TypedContainersConvert) {
  std::vector<float> floats(5);
  const MutView m = floats;
  EXPECT_EQ(m.type(), ElementType::f32);
  EXPECT_EQ(m.count(), 5u);
  EXPECT_EQ(m.size_bytes(), 20u);
  EXPECT_EQ(m.data(), reinterpret_cast<std::byte*>(floats.data()));

  const std::vector<int64_t> longs(3);
  const ConstView c = longs;
  EXPECT_EQ(c.type(), ElementType::i64);
  EXPECT_EQ(c.count(), 3u);

  Buffer<double> doubles(4);
  EXPECT_EQ(MutView(doubles).type(), ElementType::f64);
  EXPECT_EQ(ConstView(std::span<const uint8_t>()).count(), 0u);
  EXPECT_EQ(ConstView(m).type(), ElementType::f32);
}

TEST(CommBufferView, BytesMustMatchCountAndType) {
  std::vector<std::byte> bytes(10);
  EXPECT_NO_THROW(MutView(bytes, ElementType::bf16, 5));
  EXPECT_NO_THROW(ConstView(bytes, DType::u8, 10));
  try {
    MutView(bytes, ElementType::f32, 3);
    FAIL() << "12 bytes are needed";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "[comm] a view of 3 x f32 needs 12 bytes, got 10");
  }
}

TEST(CommBufferView, ElementTypesMirrorDType) {
  EXPECT_EQ(element_type(DType::bf16), ElementType::bf16);
  EXPECT_EQ(element_type(DType::i8), ElementType::i8);
  EXPECT_EQ(element_size(ElementType::f64), 8u);
  EXPECT_EQ(element_name(ElementType::u32), "u32");
}

TEST(CommReduce, SupportedReductions) {
  EXPECT_TRUE(reduction_supported(ElementType::u8, ReduceOp::sum));
  EXPECT_TRUE(reduction_supported(ElementType::i64, ReduceOp::max));
  EXPECT_TRUE(reduction_supported(ElementType::f64, ReduceOp::avg));
  EXPECT_FALSE(reduction_supported(ElementType::i32, ReduceOp::avg));
  EXPECT_FALSE(reduction_supported(ElementType::bf16, ReduceOp::sum));
  EXPECT_FALSE(reduction_supported(ElementType::f16, ReduceOp::max));
}

TEST(CommReduce, IntegerSumsWrapLikeMpi) {
  std::vector<uint8_t> acc = {250, 1};
  const std::vector<uint8_t> add = {10, 2};
  reduce_into(ElementType::u8, ReduceOp::sum, MutView(acc).data(), ConstView(add).data(), 2);
  EXPECT_EQ(acc, (std::vector<uint8_t>{4, 3}));
  std::vector<int8_t> sacc = {120, -5};
  const std::vector<int8_t> sadd = {10, -7};
  reduce_into(ElementType::i8, ReduceOp::max, MutView(sacc).data(), ConstView(sadd).data(), 2);
  EXPECT_EQ(sacc, (std::vector<int8_t>{120, -5}));
}

}  // namespace
}  // namespace flotilla::comm
