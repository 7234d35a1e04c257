// The weights of a Hugging Face model directory, looked up by tensor name.
//
// A directory holds either model.safetensors, or shards listed by
// model.safetensors.index.json ({"weight_map": {tensor name: shard file}}). As in
// transformers, model.safetensors wins when both are present. Every file is mapped once;
// tensors are converted to float32 only when read_f32 asks for them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/io/non_finite.hpp"
#include "flotilla/io/safetensors.hpp"

namespace flotilla::io {

class TensorStore {
 public:
  // `path`: a model directory, or a single .safetensors file. InputError
  // "[io/tensor_store] <path>: ..." when the directory holds no weights, the index names a
  // missing shard, or a tensor the index lists is not in its shard; header faults come
  // from SafetensorsFile.
  explicit TensorStore(const std::filesystem::path& path, NonFinitePolicy non_finite = NonFinitePolicy::warn);

  const std::filesystem::path& path() const { return path_; }
  bool has(std::string_view name) const;
  // dtype, shape, bytes and file of a tensor; InputError naming the tensor and the
  // directory when absent.
  const TensorEntry& info(std::string_view name) const;
  std::vector<std::string> names() const;  // sorted
  size_t size() const { return entries_.size(); }

  // Converts tensor `name` (F32, F16 or BF16) into `dst` as float32 after checking that
  // its shape is `expected_shape`; dst.size() must be the element count. Non-finite values
  // are reported by check_finite first.
  void read_f32(std::string_view name, std::span<float> dst,
                std::span<const int64_t> expected_shape) const;
  void read_f32(std::string_view name, std::span<float> dst,
                std::initializer_list<int64_t> expected_shape) const {
    read_f32(name, dst, std::span<const int64_t>(expected_shape.begin(), expected_shape.size()));
  }

  // A slice: elements [first, first + dst.size()) of tensor `name` in row-major order,
  // converted into dst, after the same shape and dtype checks. Only the file's bytes of
  // those elements are read (their pages of the map: the rest of the file is never touched,
  // so it never counts in the resident set); the non-finite check covers the slice, its
  // index still the tensor's flat index. A slice outside the tensor is an Error (a caller's
  // fault, not the file's).
  void read_f32_slice(std::string_view name, std::span<const int64_t> expected_shape, int64_t first,
                      std::span<float> dst) const;

  // Scans a float tensor (F32, F16, BF16; other dtypes have no NaN) for NaN and Inf; when
  // it holds any, warns or refuses as the policy says, naming the file, the tensor, how
  // many and the first one's index. `first`, `count`: only those elements (count < 0: to
  // the end).
  void check_finite(const TensorEntry& t, int64_t first = 0, int64_t count = -1) const;

 private:
  // The entry of `name` after checking its shape and that it is F32, F16 or BF16.
  const TensorEntry& float_tensor(std::string_view name, std::span<const int64_t> expected_shape) const;
  void open_single(const std::filesystem::path& file);
  void open_sharded(const std::filesystem::path& index_file);

  std::filesystem::path path_;
  NonFinitePolicy non_finite_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorEntry*, std::less<>> entries_;
};

}  // namespace flotilla::io
