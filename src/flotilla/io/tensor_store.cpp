#include "flotilla/io/tensor_store.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/file.hpp"
#include "flotilla/base/log.hpp"

namespace flotilla::io {
namespace {
constexpr std::string_view kTensorStoreComponent = "io/tensor_store";

[[noreturn]] void fail(const std::filesystem::path& file, std::string_view what) {
  throw InputError(kTensorStoreComponent, file.string() + ": " + std::string(what));
}

// What a directory without safetensors weights holds instead, for the error's hint.
std::string describe_missing_weights(const std::filesystem::path& dir) {
  std::vector<std::string> safetensors, other_weights;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const std::string ext = e.path().extension().string();
    if (ext == ".safetensors") safetensors.push_back(name);
    else if (ext == ".bin" || ext == ".pt" || ext == ".pth" || ext == ".gguf")
      other_weights.push_back(name);
  }
  std::sort(safetensors.begin(), safetensors.end());
  std::sort(other_weights.begin(), other_weights.end());
  std::string msg = "no model.safetensors or model.safetensors.index.json";
  if (!safetensors.empty())
    msg += fmt::format(" (found {}; pass a .safetensors file to open it alone)",
                       fmt::join(safetensors, ", "));
  else if (!other_weights.empty())
    msg += fmt::format(" (found {}: only safetensors weights are read; convert them)",
                       fmt::join(other_weights, ", "));
  return msg;
}
}  // namespace

TensorStore::TensorStore(const std::filesystem::path& path, NonFinitePolicy non_finite)
    : path_(path), non_finite_(non_finite) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) fail(path, "no such file or directory");
  if (std::filesystem::is_regular_file(status)) {
    open_single(path);
    return;
  }
  if (!std::filesystem::is_directory(status)) fail(path, "not a directory or a file");
  if (std::filesystem::exists(path / "model.safetensors")) {
    open_single(path / "model.safetensors");
  } else if (std::filesystem::exists(path / "model.safetensors.index.json")) {
    open_sharded(path / "model.safetensors.index.json");
  } else {
    fail(path, describe_missing_weights(path));
  }
}

void TensorStore::open_single(const std::filesystem::path& file) {
  files_.push_back(std::make_unique<SafetensorsFile>(file));
  for (const auto& t : files_.back()->tensors()) entries_.emplace(t.name, &t);
}

void TensorStore::open_sharded(const std::filesystem::path& index_file) {
  const std::string text = read_text_file(index_file);
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail(index_file, fmt::format("not valid JSON (byte {}): {}", e.byte, json_error_text(e)));
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail(index_file, "missing object 'weight_map'");

  const std::filesystem::path dir = index_file.parent_path();
  std::map<std::string, SafetensorsFile*> shards;  // shard file name -> opened file
  for (const auto& [name, shard_json] : index["weight_map"].items()) {
    if (!shard_json.is_string())
      fail(index_file, fmt::format("weight_map entry for '{}' is not a string", name));
    const std::string shard = shard_json.get<std::string>();
    auto it = shards.find(shard);
    if (it == shards.end()) {
      const std::filesystem::path rel(shard);
      // Shards sit next to the index; anything else is a corrupt or hostile index.
      if (rel.empty() || rel.is_absolute() || rel.has_parent_path())
        fail(index_file, fmt::format("tensor '{}' names shard '{}', which is not a file name in "
                                     "the model directory",
                                     name, shard));
      const std::filesystem::path shard_path = dir / rel;
      if (!std::filesystem::is_regular_file(shard_path))
        fail(index_file, fmt::format("shard '{}' (listed for tensor '{}') does not exist in {}",
                                     shard, name, dir.string()));
      files_.push_back(std::make_unique<SafetensorsFile>(shard_path));
      it = shards.emplace(shard, files_.back().get()).first;
    }
    const TensorEntry* t = it->second->find(name);
    if (!t)
      fail(it->second->path(),
           fmt::format("tensor '{}' listed in {} is missing from this shard", name,
                       index_file.filename().string()));
    entries_.emplace(name, t);
  }
  // transformers loads every tensor of every shard, listed or not; so do we (the index's
  // entry wins for a name found in two shards).
  for (const auto& f : files_)
    for (const auto& t : f->tensors()) entries_.try_emplace(t.name, &t);
}

bool TensorStore::has(std::string_view name) const { return entries_.find(name) != entries_.end(); }

const TensorEntry& TensorStore::info(std::string_view name) const {
  const auto it = entries_.find(name);
  if (it != entries_.end()) return *it->second;
  // Most misses are a prefix mismatch ("model." or "base_model.model."): suggest a name
  // that one of the two ends with.
  std::string hint;
  for (const auto& [stored, _] : entries_) {
    const std::string_view s = stored;
    if ((s.size() > name.size() && s.ends_with(name) && s[s.size() - name.size() - 1] == '.') ||
        (name.size() > s.size() && name.ends_with(s) && name[name.size() - s.size() - 1] == '.')) {
      hint = fmt::format(" (did you mean '{}'?)", stored);
      break;
    }
  }
  fail(path_, fmt::format("no tensor '{}' among its {} tensors{}", name, entries_.size(), hint));
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, _] : entries_) out.push_back(name);
  return out;
}

const TensorEntry& TensorStore::float_tensor(std::string_view name, std::span<const int64_t> expected_shape) const {
  const TensorEntry& t = info(name);
  if (!std::equal(t.shape.begin(), t.shape.end(), expected_shape.begin(), expected_shape.end()))
    fail(t.file, fmt::format("tensor '{}' has shape {}, expected {}", name, format_shape(t.shape),
                             format_shape(expected_shape)));
  if (t.dtype != DType::f32 && t.dtype != DType::f16 && t.dtype != DType::bf16)
    fail(t.file, fmt::format("tensor '{}' has dtype {}, expected F32, F16 or BF16", name,
                             dtype_name(t.dtype)));
  return t;
}

void TensorStore::read_f32(std::string_view name, std::span<float> dst,
                           std::span<const int64_t> expected_shape) const {
  const TensorEntry& t = float_tensor(name, expected_shape);
  if (dst.size() != static_cast<size_t>(t.numel()))
    throw Error(kTensorStoreComponent, fmt::format("read_f32('{}'): destination holds {} floats, the tensor "
                                        "has {}",
                                        name, dst.size(), t.numel()));
  read_f32_slice(name, expected_shape, 0, dst);
}

void TensorStore::read_f32_slice(std::string_view name, std::span<const int64_t> expected_shape, int64_t first,
                                 std::span<float> dst) const {
  const TensorEntry& t = float_tensor(name, expected_shape);
  const auto count = static_cast<int64_t>(dst.size());
  if (first < 0 || first + count > t.numel())
    throw Error(kTensorStoreComponent, fmt::format("read_f32_slice('{}'): elements [{}, {}) lie outside its {}", name, first,
                                        first + count, t.numel()));
  check_finite(t, first, count);
  convert_to_f32(t.dtype, t.bytes.data() + static_cast<size_t>(first) * dtype_size(t.dtype), dst);
}

void TensorStore::check_finite(const TensorEntry& t, int64_t slice_first, int64_t slice_count) const {
  // The exponent bits all ones: Inf or NaN, in each format.
  uint64_t count = 0, first = 0;
  float first_value = 0.0f;
  const auto scan = [&]<typename Bits>(Bits exponent_mask, auto to_float) {
    const size_t n = t.bytes.size() / sizeof(Bits);
    const size_t begin = std::min(n, static_cast<size_t>(slice_first));
    const size_t end = slice_count < 0 ? n : std::min(n, begin + static_cast<size_t>(slice_count));
    for (size_t i = begin; i < end; ++i) {
      Bits b;
      std::memcpy(&b, t.bytes.data() + i * sizeof(Bits), sizeof(Bits));
      if ((b & exponent_mask) != exponent_mask) continue;
      if (count++ == 0) {
        first = i;
        first_value = to_float(b);
      }
    }
  };
  switch (t.dtype) {
    case DType::f32: scan(uint32_t{0x7F800000u}, [](uint32_t b) { return std::bit_cast<float>(b); }); break;
    case DType::f16: scan(uint16_t{0x7C00u}, [](uint16_t b) { return f16_to_f32(b); }); break;
    case DType::bf16: scan(uint16_t{0x7F80u}, [](uint16_t b) { return bf16_to_f32(b); }); break;
    default: return;
  }
  if (count == 0) return;
  const int64_t slice_end = slice_count < 0 ? t.numel() : slice_first + slice_count;
  const bool whole = slice_first == 0 && slice_end == t.numel();
  const std::string what = fmt::format(
      "{}: tensor '{}' holds {} non-finite value{}{} (the first, {}, at flat index {})", t.file.string(), t.name,
      count, count == 1 ? "" : "s",
      whole ? std::string() : fmt::format(" among elements [{}, {}), the part read", slice_first, slice_end),
      std::isnan(first_value) ? "NaN" : first_value > 0 ? "inf" : "-inf", first);
  if (non_finite_ == NonFinitePolicy::refuse) throw InputError(kTensorStoreComponent, what + " (refused: --strict)");
  log::warn("{} (pass --strict to refuse such weights)", what);
}

}  // namespace flotilla::io
