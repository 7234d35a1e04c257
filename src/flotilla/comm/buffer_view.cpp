#include "flotilla/comm/buffer_view.hpp"

#include <array>

#include <fmt/format.h>

#include "flotilla/base/error.hpp"

namespace flotilla::comm {
namespace {

struct ElementInfo {
  std::string_view name;
  size_t size;
};
// Indexed by ElementType; the first eight mirror DType.
constexpr std::array<ElementInfo, 9> kInfo{{{"f32", 4},
                                            {"f16", 2},
                                            {"bf16", 2},
                                            {"i32", 4},
                                            {"u32", 4},
                                            {"i64", 8},
                                            {"u8", 1},
                                            {"i8", 1},
                                            {"f64", 8}}};

static_assert(element_type(DType::f32) == ElementType::f32 &&
              element_type(DType::f16) == ElementType::f16 &&
              element_type(DType::bf16) == ElementType::bf16 &&
              element_type(DType::i32) == ElementType::i32 &&
              element_type(DType::u32) == ElementType::u32 &&
              element_type(DType::i64) == ElementType::i64 &&
              element_type(DType::u8) == ElementType::u8 &&
              element_type(DType::i8) == ElementType::i8,
              "ElementType must list DType's values in DType's order");

void check_size(size_t bytes, ElementType type, size_t count) {
  if (bytes != count * element_size(type))
    throw Error("comm", fmt::format("a view of {} x {} needs {} bytes, got {}", count,
                                    element_name(type), count * element_size(type), bytes));
}

}  // namespace

size_t element_size(ElementType type) { return kInfo.at(static_cast<size_t>(type)).size; }
std::string_view element_name(ElementType type) {
  return kInfo.at(static_cast<size_t>(type)).name;
}

ConstView::ConstView(std::span<const std::byte> bytes, ElementType type, size_t count)
    : data_(bytes.data()), count_(count), type_(type) {
  check_size(bytes.size(), type, count);
}

MutView::MutView(std::span<std::byte> bytes, ElementType type, size_t count)
    : data_(bytes.data()), count_(count), type_(type) {
  check_size(bytes.size(), type, count);
}

}  // namespace flotilla::comm
