// CRC-32C (Castagnoli, the iSCSI / ext4 / RocksDB polynomial): the checksum of what
// flotilla writes and reads back later (checkpoints, prepared token shards).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace flotilla {

// Continues from `crc` (0 for a new checksum): crc32c(b, crc32c(a)) == crc32c(a + b). Uses
// the CPU's crc32 instruction when the build targets SSE 4.2, else crc32c_portable.
uint32_t crc32c(std::span<const std::byte> data, uint32_t crc = 0);
// The table-driven version (slicing by 8), identical results on every machine.
uint32_t crc32c_portable(std::span<const std::byte> data, uint32_t crc = 0);
// "e3069283": eight lower-case hex digits, as manifests and indexes record it.
std::string crc32c_hex(uint32_t crc);

}  // namespace flotilla
