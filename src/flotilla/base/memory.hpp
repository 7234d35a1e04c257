#pragma once

#include <cstddef>
#include <cstdint>

namespace flotilla {

// Peak resident set size of this process so far (VmHWM), in bytes; 0 where unknown.
int64_t peak_rss_bytes();
// Current resident set size (VmRSS), in bytes; 0 where unknown.
int64_t current_rss_bytes();
// Physical memory of this machine (all of it, not what is free), in bytes; 0 where unknown.
int64_t physical_memory_bytes();

// Zeroes `bytes` bytes at `data` (private anonymous memory: the heap, a Buffer) and hands
// the whole pages among them back to the operating system: they no longer count in the
// resident set, read as zero, and are mapped afresh on the next write. The partial pages at
// either end are zeroed in place.
void release_zeroed(void* data, size_t bytes);
// Hands back the whole pages among `bytes` bytes at `data` of a read-only file mapping
// (base/file.hpp's MappedFile): they leave the resident set, and are read from the file
// again on the next access. Not for anonymous memory, whose contents it would discard.
void drop_file_pages(const void* data, size_t bytes);

}  // namespace flotilla
