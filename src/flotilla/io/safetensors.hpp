// safetensors: the tensor file format of Hugging Face (https://github.com/huggingface/safetensors).
//
// Layout: an 8-byte little-endian u64 N, then N bytes of UTF-8 JSON (the *header*), then
// the *data section*. The header maps each tensor name to {"dtype", "shape",
// "data_offsets": [begin, end]} with offsets relative to the start of the data section;
// the optional key "__metadata__" maps strings to strings (transformers wants
// {"format": "pt"}).
//
// Reading maps the file once and hands out spans into the map: nothing is copied until a
// caller converts a tensor. Writing streams: the header is computed from the shapes alone,
// then each tensor is converted chunk by chunk, so a 7B model never exists twice in memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "flotilla/base/file.hpp"
#include "flotilla/tensor/dtype.hpp"

namespace flotilla::io {

// One tensor of an opened file. `bytes` points into the file's mmap and lives as long as
// the SafetensorsFile (or TensorStore) that handed it out.
struct TensorEntry {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
  std::filesystem::path file;  // the .safetensors file it lives in, for error messages

  int64_t numel() const;
};

// "[64, 32]"
std::string format_shape(std::span<const int64_t> shape);

// An opened, fully validated .safetensors file. Every fault in the header is an
// InputError "[io/safetensors] <file>: <fault>", naming the tensor when there is one.
// As the format requires (and the safetensors library checks), the tensors tile the data
// section exactly: duplicate keys, overlapping tensors, gaps and trailing bytes are refused.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_.path(); }
  // In header order (the writer's order for files we wrote).
  const std::vector<TensorEntry>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorEntry* find(std::string_view name) const;
  // InputError naming the file and the tensor when absent.
  const TensorEntry& at(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  MappedFile file_;
  std::vector<TensorEntry> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A float32 tensor to be written; `data` holds product(shape) floats, row-major.
struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
};

using SafetensorsMetadata = std::map<std::string, std::string>;

// Writes `tensors` in the given order, converted to `out_dtype` (F32, F16 or BF16),
// atomically (temp file, fsync, rename). "format": "pt" is added to `metadata` unless it
// sets "format" itself. The header is padded with spaces to a multiple of 8 bytes so the
// data section is aligned.
void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                       DType out_dtype, const SafetensorsMetadata& metadata = {});

// Bytes write_safetensors would put in the data section for these tensors.
uint64_t safetensors_data_bytes(std::span<const TensorToWrite> tensors, DType out_dtype);

// Writes a Hugging Face model directory's weights into `dir` (created if missing):
// model.safetensors when the data fits in `max_shard_bytes`, else shards
// model-00001-of-0000N.safetensors (tensors in order, a new shard whenever the next tensor
// would overflow the current one; a tensor larger than the limit gets a shard alone) and
// model.safetensors.index.json {"metadata": {"total_size"}, "weight_map"}.
// Weight files of the other layout left in `dir` by an earlier save (a model.safetensors
// next to new shards, an index or shards next to a new model.safetensors) are removed
// after the new files are in place, since they would shadow or contradict them.
// Returns the files written, in order.
// The sharding both writers share: tensors of `tensor_bytes` (in file order) and their
// `names` go into model.safetensors when they fit in max_shard_bytes, else greedily in order
// into model-0000i-of-0000n.safetensors (a shard takes tensors until the next would overflow
// it) plus model.safetensors.index.json. `write_file(path, first, last)` writes tensors
// [first, last) to one file. Returns the files written, the index last.
std::vector<std::filesystem::path> write_weight_files(
    const std::filesystem::path& dir, std::span<const uint64_t> tensor_bytes, std::span<const std::string> names,
    uint64_t max_shard_bytes,
    const std::function<void(const std::filesystem::path&, size_t first, size_t last)>& write_file);

std::vector<std::filesystem::path> write_safetensors_sharded(
    const std::filesystem::path& dir, std::span<const TensorToWrite> tensors, DType out_dtype,
    uint64_t max_shard_bytes, const SafetensorsMetadata& metadata = {});

}  // namespace flotilla::io
