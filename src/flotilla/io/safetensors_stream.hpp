// Streaming safetensors writer for tensors of mixed dtypes that do not exist in memory all
// at once: the header is computed from (name, dtype, shape) alone, then a callback writes
// each tensor's bytes in order. A 7B model is generated, converted or quantized one tensor
// at a time, so peak memory is one tensor, not the model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "flotilla/base/file.hpp"
#include "flotilla/io/safetensors.hpp"

namespace flotilla::io {

struct TensorSpec {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  uint64_t bytes() const;
};

// Where one tensor's bytes go; the writer checks that exactly spec.bytes() arrive.
class TensorSink {
 public:
  explicit TensorSink(AtomicFileWriter& out) : out_(out) {}
  void write(std::span<const std::byte> data) {
    out_.write(data);
    written_ += data.size();
  }
  uint64_t written() const { return written_; }

 private:
  AtomicFileWriter& out_;
  uint64_t written_ = 0;
};

using TensorWriteFn = std::function<void(size_t index, TensorSink& sink)>;

// Writes `specs` into `dir` (which must exist) as model.safetensors, or as shards
// model-0000i-of-0000N.safetensors plus model.safetensors.index.json when the data exceeds
// max_shard_bytes (same greedy split as write_safetensors_sharded). Each file is atomic.
// write_tensor(i, sink) is called once per tensor, in order. Returns the files written.
std::vector<std::filesystem::path> write_safetensors_streamed(const std::filesystem::path& dir,
                                                              std::span<const TensorSpec> specs,
                                                              uint64_t max_shard_bytes,
                                                              const TensorWriteFn& write_tensor,
                                                              const SafetensorsMetadata& metadata = {});

}  // namespace flotilla::io
