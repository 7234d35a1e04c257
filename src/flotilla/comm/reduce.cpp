#include "flotilla/comm/reduce.hpp"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla::comm {
namespace {

template <class T>
T add(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(static_cast<U>(a) + static_cast<U>(b)));
  } else {
    return a + b;
  }
}

// Memory may be unaligned (a view into a byte stream), hence memcpy per element; the
// compiler turns it into plain loads and stores.
// The operation is a template argument so that each loop is branch-free and vectorises:
// the all-reduce algorithms (comm/algorithms/) reduce every received segment here.
template <class T, bool kMax>
void reduce_loop(std::byte* acc, const std::byte* src, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    T a, b;
    std::memcpy(&a, acc + i * sizeof(T), sizeof(T));
    std::memcpy(&b, src + i * sizeof(T), sizeof(T));
    const T r = kMax ? std::max(a, b) : add(a, b);
    std::memcpy(acc + i * sizeof(T), &r, sizeof(T));
  }
}

template <class T>
void reduce_typed(ReduceOp op, std::byte* acc, const std::byte* src, size_t count) {
  if (op == ReduceOp::max)
    reduce_loop<T, true>(acc, src, count);
  else
    reduce_loop<T, false>(acc, src, count);
}

template <class T>
void divide_typed(std::byte* data, size_t count, int divisor) {
  const T d = static_cast<T>(divisor);
  for (size_t i = 0; i < count; ++i) {
    T v;
    std::memcpy(&v, data + i * sizeof(T), sizeof(T));
    v /= d;
    std::memcpy(data + i * sizeof(T), &v, sizeof(T));
  }
}

}  // namespace

std::string_view reduce_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::avg: return "avg";
    case ReduceOp::max: return "max";
  }
  return "?";
}

bool reduction_supported(ElementType type, ReduceOp op) {
  if (type == ElementType::f16 || type == ElementType::bf16) return false;
  if (op == ReduceOp::avg) return type == ElementType::f32 || type == ElementType::f64;
  return true;
}

void reduce_into(ElementType type, ReduceOp op, std::byte* acc, const std::byte* src,
                 size_t count) {
  if (op == ReduceOp::avg || !reduction_supported(type, op))
    throw Error("comm", fmt::format("reduce_into: {} of {} is not a kernel", reduce_name(op),
                                    element_name(type)));
  switch (type) {
    case ElementType::f32: return reduce_typed<float>(op, acc, src, count);
    case ElementType::f64: return reduce_typed<double>(op, acc, src, count);
    case ElementType::i32: return reduce_typed<int32_t>(op, acc, src, count);
    case ElementType::u32: return reduce_typed<uint32_t>(op, acc, src, count);
    case ElementType::i64: return reduce_typed<int64_t>(op, acc, src, count);
    case ElementType::u8: return reduce_typed<uint8_t>(op, acc, src, count);
    case ElementType::i8: return reduce_typed<int8_t>(op, acc, src, count);
    case ElementType::f16:
    case ElementType::bf16: break;
  }
}

void divide(ElementType type, std::byte* data, size_t count, int divisor) {
  if (type == ElementType::f32) return divide_typed<float>(data, count, divisor);
  if (type == ElementType::f64) return divide_typed<double>(data, count, divisor);
  throw Error("comm", fmt::format("divide: {} is not averaged", element_name(type)));
}

}  // namespace flotilla::comm
