// What comm moves: `count` elements of one element type, as bytes. Typed containers
// (std::vector<float>, std::span<int64_t>, flotilla::Buffer<double>, ...) convert
// implicitly, so `comm.all_reduce(grads, ReduceOp::avg)` needs no ceremony.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <span>
#include <string_view>
#include <type_traits>

#include "flotilla/tensor/dtype.hpp"

namespace flotilla::comm {

// DType's values, in DType's order, plus f64: losses, token counts and metrics are
// reduced in double, and DType lists only what tensor files store.
enum class ElementType : uint8_t { f32, f16, bf16, i32, u32, i64, u8, i8, f64 };

size_t element_size(ElementType type);
std::string_view element_name(ElementType type);  // "f32", "bf16", "f64", ...
constexpr ElementType element_type(DType dt) { return static_cast<ElementType>(dt); }

template <class T>
inline constexpr bool is_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int32_t> ||
    std::is_same_v<T, uint32_t> || std::is_same_v<T, int64_t> || std::is_same_v<T, uint8_t> ||
    std::is_same_v<T, int8_t>;

template <class T>
constexpr ElementType element_type_of() {
  static_assert(is_element_v<T>, "comm moves float, double, int32/uint32, int64, int8/uint8");
  if constexpr (std::is_same_v<T, float>) return ElementType::f32;
  else if constexpr (std::is_same_v<T, double>) return ElementType::f64;
  else if constexpr (std::is_same_v<T, int32_t>) return ElementType::i32;
  else if constexpr (std::is_same_v<T, uint32_t>) return ElementType::u32;
  else if constexpr (std::is_same_v<T, int64_t>) return ElementType::i64;
  else if constexpr (std::is_same_v<T, uint8_t>) return ElementType::u8;
  else return ElementType::i8;
}

namespace detail {
template <class R>
using range_element_t = std::remove_reference_t<decltype(*std::data(std::declval<R&>()))>;
}

// A contiguous range of one of the element types above (anything with data() and size()).
template <class R>
concept ConstElementRange = requires(R& r) {
  std::data(r);
  std::size(r);
} && is_element_v<std::remove_const_t<detail::range_element_t<R>>>;

template <class R>
concept ElementRange = ConstElementRange<R> && !std::is_const_v<detail::range_element_t<R>>;

// Read-only elements: bytes.size() == count * element_size(type).
class ConstView {
 public:
  ConstView() = default;
  // Throws flotilla::Error when bytes.size() != count * element_size(type).
  ConstView(std::span<const std::byte> bytes, ElementType type, size_t count);
  ConstView(std::span<const std::byte> bytes, DType type, size_t count)
      : ConstView(bytes, element_type(type), count) {}
  template <ConstElementRange R>
  ConstView(const R& r)  // NOLINT(google-explicit-constructor): the typed convenience
      : data_(reinterpret_cast<const std::byte*>(std::data(r))),
        count_(std::size(r)),
        type_(element_type_of<std::remove_const_t<detail::range_element_t<const R>>>()) {}

  const std::byte* data() const { return data_; }
  size_t count() const { return count_; }
  ElementType type() const { return type_; }
  size_t size_bytes() const { return count_ * element_size(type_); }
  std::span<const std::byte> bytes() const { return {data_, size_bytes()}; }

 private:
  const std::byte* data_ = nullptr;
  size_t count_ = 0;
  ElementType type_ = ElementType::u8;
};

// Writable elements; converts to ConstView.
class MutView {
 public:
  MutView() = default;
  MutView(std::span<std::byte> bytes, ElementType type, size_t count);
  MutView(std::span<std::byte> bytes, DType type, size_t count)
      : MutView(bytes, element_type(type), count) {}
  template <ElementRange R>
  MutView(R&& r)  // NOLINT(google-explicit-constructor)
      : data_(reinterpret_cast<std::byte*>(std::data(r))),
        count_(std::size(r)),
        type_(element_type_of<detail::range_element_t<R>>()) {}

  std::byte* data() const { return data_; }
  size_t count() const { return count_; }
  ElementType type() const { return type_; }
  size_t size_bytes() const { return count_ * element_size(type_); }
  std::span<std::byte> bytes() const { return {data_, size_bytes()}; }
  operator ConstView() const { return ConstView(bytes(), type_, count_); }  // NOLINT

 private:
  std::byte* data_ = nullptr;
  size_t count_ = 0;
  ElementType type_ = ElementType::u8;
};

}  // namespace flotilla::comm
