#pragma once

#include <cstdint>

namespace flotilla {

// Peak resident set size of this process so far (VmHWM), in bytes; 0 where unknown.
int64_t peak_rss_bytes();
// Current resident set size (VmRSS), in bytes; 0 where unknown.
int64_t current_rss_bytes();
// Physical memory of this machine (all of it, not what is free), in bytes; 0 where unknown.
int64_t physical_memory_bytes();

}  // namespace flotilla
