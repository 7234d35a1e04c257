#include "flotilla/text/unicode_classes.hpp"

namespace flotilla::text {

CharClass char_class_slow(char32_t cp) {
  using unicode_detail::kClassRangeCount;
  using unicode_detail::kClassRanges;
  // Last range whose first <= cp.
  size_t lo = 0;
  size_t hi = kClassRangeCount;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (kClassRanges[mid].first <= cp) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo == 0) return CharClass::kOther;
  const unicode_detail::CodePointRange& r = kClassRanges[lo - 1];
  return cp <= r.last ? r.cls : CharClass::kOther;
}

}  // namespace flotilla::text
