// CRC-32C (Castagnoli, the iSCSI / ext4 / RocksDB polynomial): the checksum of what
// flotilla writes and reads back later (checkpoints, prepared token shards).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

namespace flotilla {

// Continues from `crc` (0 for a new checksum): crc32c(b, crc32c(a)) == crc32c(a + b). Uses
// the CPU's crc32 instruction when the build targets SSE 4.2, else crc32c_portable.
uint32_t crc32c(std::span<const std::byte> data, uint32_t crc = 0);
// The table-driven version (slicing by 8), identical results on every machine.
uint32_t crc32c_portable(std::span<const std::byte> data, uint32_t crc = 0);
// A whole file's length and CRC-32C, read in pieces of `chunk_bytes` (base/file.hpp's
// read_file_chunks: memory stays bounded whatever the file's size). Each piece continues
// the checksum of those before it, so the result does not depend on `chunk_bytes`, which
// exists for tests. InputError naming the file when it cannot be read.
struct FileChecksum {
  uint64_t bytes = 0;
  uint32_t crc32c = 0;
};
FileChecksum crc32c_file(const std::filesystem::path& path, size_t chunk_bytes = size_t{1} << 20);
// "e3069283": eight lower-case hex digits, as manifests and indexes record it.
std::string crc32c_hex(uint32_t crc);

}  // namespace flotilla
