#include "flotilla/io/safetensors.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <system_error>

#include "flotilla/base/error.hpp"
#include "flotilla/base/json_error.hpp"
#include "flotilla/base/log.hpp"

namespace flotilla::io {
namespace {
constexpr std::string_view kSafetensorsComponent = "io/safetensors";

// A real header is a few MB at most (MLX 4-bit 70B: ~2 MB); past this it is garbage, and
// refusing it keeps a corrupt length from driving a huge allocation.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// A safetensors header nests 3 deep: {name: {"shape": [dims]}}.
constexpr int kMaxHeaderDepth = 3;
// Elements converted per write() when the output dtype is not f32.
constexpr size_t kWriteChunkElements = size_t{1} << 20;

static_assert(std::endian::native == std::endian::little,
              "safetensors is little-endian; a big-endian host needs byte swaps here");

using ordered_json = nlohmann::ordered_json;

[[noreturn]] void fail(const std::filesystem::path& file, std::string_view what) {
  throw InputError(kSafetensorsComponent, file.string() + ": " + std::string(what));
}

// A non-negative JSON integer, or nullopt for anything else (negative, float, string...).
std::optional<uint64_t> as_u64(const ordered_json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  return std::nullopt;
}

std::string supported_dtypes() {
  std::string s;
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::i32, DType::u32, DType::i64,
                   DType::u8, DType::i8}) {
    if (!s.empty()) s += ", ";
    s += dtype_name(dt);
  }
  return s;
}

TensorEntry parse_tensor_entry(const std::filesystem::path& file, const std::string& name,
                               const ordered_json& v, uint64_t data_bytes,
                               const std::byte* data) {
  const auto where = [&](std::string_view fault) {
    return fmt::format("tensor '{}': {}", name, fault);
  };
  if (!v.is_object()) fail(file, where("entry is not a JSON object"));
  TensorEntry t;
  t.name = name;
  t.file = file;

  const auto dtype_it = v.find("dtype");
  if (dtype_it == v.end() || !dtype_it->is_string())
    fail(file, where("missing string field 'dtype'"));
  const auto dtype_str = dtype_it->get<std::string>();
  const auto dtype = parse_dtype(dtype_str);
  if (!dtype)
    fail(file, where(fmt::format("unsupported dtype '{}' (supported: {})", dtype_str,
                                 supported_dtypes())));
  t.dtype = *dtype;

  const auto shape_it = v.find("shape");
  if (shape_it == v.end() || !shape_it->is_array())
    fail(file, where("missing array field 'shape'"));
  uint64_t numel = 1;
  for (const auto& d : *shape_it) {
    const auto dim = as_u64(d);
    if (!dim || *dim > static_cast<uint64_t>(INT64_MAX))
      fail(file, where(fmt::format("shape {} has an entry that is not a non-negative integer",
                                   shape_it->dump())));
    if (__builtin_mul_overflow(numel, *dim, &numel))
      fail(file, where(fmt::format("shape {} has too many elements", shape_it->dump())));
    t.shape.push_back(static_cast<int64_t>(*dim));
  }
  uint64_t expected_bytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &expected_bytes))
    fail(file, where(fmt::format("shape {} has too many elements", shape_it->dump())));

  const auto off_it = v.find("data_offsets");
  if (off_it == v.end() || !off_it->is_array() || off_it->size() != 2 || !as_u64((*off_it)[0]) ||
      !as_u64((*off_it)[1]))
    fail(file, where("'data_offsets' must be [begin, end] with non-negative integers"));
  const uint64_t begin = *as_u64((*off_it)[0]);
  const uint64_t end = *as_u64((*off_it)[1]);
  if (begin > end)
    fail(file, where(fmt::format("data_offsets [{}, {}] has begin > end", begin, end)));
  if (end > data_bytes)
    fail(file, where(fmt::format("data_offsets [{}, {}] out of range: the data section has {} "
                                 "bytes (file truncated?)",
                                 begin, end, data_bytes)));
  if (end - begin != expected_bytes)
    fail(file, where(fmt::format("data_offsets [{}, {}] hold {} bytes, but shape {} of {} needs {}",
                                 begin, end, end - begin, format_shape(t.shape), dtype_str,
                                 expected_bytes)));
  t.bytes = std::span<const std::byte>(data + begin, end - begin);
  return t;
}

// The format's rule for the data section: the tensors, in offset order, tile it exactly.
// An overlap would let one write through a tensor change another; a gap or trailing bytes
// are data no tensor owns (a file appended to, or cut and patched). The safetensors library
// refuses all three, so a file we accept is one it reads the same way.
void check_data_layout(const std::filesystem::path& file, std::span<const TensorEntry> tensors,
                       const std::byte* data, uint64_t data_bytes) {
  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  ranges.reserve(tensors.size());
  for (const TensorEntry& t : tensors) {
    const auto begin = static_cast<uint64_t>(t.bytes.data() - data);
    ranges.push_back({begin, begin + t.bytes.size(), &t.name});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t covered = 0;  // the data section is tiled up to here
  const std::string* previous = nullptr;
  for (const Range& r : ranges) {
    if (r.begin < covered)
      fail(file, fmt::format("tensor '{}': data_offsets [{}, {}] overlap tensor '{}', which ends at {}", *r.name,
                             r.begin, r.end, *previous, covered));
    if (r.begin > covered)
      fail(file, fmt::format("bytes [{}, {}) of the data section belong to no tensor (tensor '{}' starts at {})",
                             covered, r.begin, *r.name, r.begin));
    covered = r.end;
    previous = r.name;
  }
  if (covered != data_bytes)
    fail(file, fmt::format("{} trailing bytes after the last tensor: the data section has {} bytes, the tensors "
                           "cover {}",
                           data_bytes - covered, data_bytes, covered));
}

// The JSON header, space-padded so that 8 + its length is a multiple of 8.
std::string build_header(std::span<const TensorToWrite> tensors, DType out_dtype,
                         const SafetensorsMetadata& metadata) {
  ordered_json header = ordered_json::object();
  ordered_json meta = ordered_json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  if (!meta.contains("format")) meta["format"] = "pt";
  header["__metadata__"] = std::move(meta);

  const size_t elem = dtype_size(out_dtype);
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    ordered_json entry;
    entry["dtype"] = std::string(dtype_name(out_dtype));
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + numel * elem};
    offset += numel * elem;
    header[t.name] = std::move(entry);
  }
  std::string text = header.dump();
  // Pad so the data section starts 8-byte aligned (what the safetensors library does).
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  return text;
}

uint64_t tensor_numel(const TensorToWrite& t) {
  uint64_t n = 1;
  for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
  return n;
}

// Programmer errors (not user input): a caller handed the writer an impossible tensor list.
void check_tensors_to_write(const std::filesystem::path& path,
                            std::span<const TensorToWrite> tensors, DType out_dtype) {
  if (out_dtype != DType::f32 && out_dtype != DType::f16 && out_dtype != DType::bf16)
    throw Error(kSafetensorsComponent, fmt::format("{}: cannot write dtype {} (F32, F16 or BF16 only)",
                                        path.string(), dtype_name(out_dtype)));
  std::set<std::string_view> seen;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      throw Error(kSafetensorsComponent, fmt::format("{}: invalid tensor name '{}'", path.string(), t.name));
    if (!seen.insert(t.name).second)
      throw Error(kSafetensorsComponent, fmt::format("{}: tensor '{}' given twice", path.string(), t.name));
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0)
        throw Error(kSafetensorsComponent, fmt::format("{}: tensor '{}' has negative shape {}", path.string(),
                                            t.name, format_shape(t.shape)));
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel))
        throw Error(kSafetensorsComponent, fmt::format("{}: tensor '{}' shape {} overflows", path.string(),
                                            t.name, format_shape(t.shape)));
    }
    if (numel > 0 && t.data == nullptr)
      throw Error(kSafetensorsComponent, fmt::format("{}: tensor '{}' has no data", path.string(), t.name));
  }
}

void write_tensor_data(AtomicFileWriter& out, const TensorToWrite& t, DType out_dtype,
                       std::vector<uint16_t>& chunk) {
  const size_t n = tensor_numel(t);
  if (out_dtype == DType::f32) {
    out.write(std::as_bytes(std::span<const float>(t.data, n)));
    return;
  }
  for (size_t start = 0; start < n; start += kWriteChunkElements) {
    const size_t count = std::min(kWriteChunkElements, n - start);
    chunk.resize(count);
    const float* src = t.data + start;
    if (out_dtype == DType::bf16) {
      for (size_t i = 0; i < count; ++i) chunk[i] = f32_to_bf16(src[i]);
    } else {
      for (size_t i = 0; i < count; ++i) chunk[i] = f32_to_f16(src[i]);
    }
    out.write(std::as_bytes(std::span<const uint16_t>(chunk)));
  }
}

bool is_shard_name(const std::string& name) {
  static const std::regex kShard(R"(model-\d{5}-of-\d{5}\.safetensors)");
  return std::regex_match(name, kShard);
}

// Removes weight files in `dir` that belong to another layout than `written`.
void remove_stale_weight_files(const std::filesystem::path& dir,
                               const std::vector<std::filesystem::path>& written) {
  std::set<std::string> keep;
  for (const auto& p : written) keep.insert(p.filename().string());
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (keep.count(name)) continue;
    if (name == "model.safetensors" || name == "model.safetensors.index.json" ||
        is_shard_name(name)) {
      std::error_code rm_ec;
      std::filesystem::remove(e.path(), rm_ec);
      if (rm_ec)
        throw Error(kSafetensorsComponent, fmt::format("{}: cannot remove stale weight file: {}",
                                            e.path().string(), rm_ec.message()));
      log::info("[{}] removed stale {}", kSafetensorsComponent, e.path().string());
    }
  }
}
}  // namespace

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string format_shape(std::span<const int64_t> shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(path) {
  const auto bytes = file_.bytes();
  if (bytes.size() < 8)
    fail(path, fmt::format("file is {} bytes, too short for the 8-byte header length (truncated?)",
                           bytes.size()));
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, bytes.data(), 8);
  if (header_bytes > kMaxHeaderBytes)
    fail(path, fmt::format("header length {} is absurd (limit {} bytes): not a safetensors file?",
                           header_bytes, kMaxHeaderBytes));
  if (header_bytes > bytes.size() - 8)
    fail(path, fmt::format("header length {} exceeds the file size {} (truncated?)", header_bytes,
                           bytes.size()));

  const char* text = reinterpret_cast<const char*>(bytes.data() + 8);
  ordered_json header;
  try {
    // The parser keeps the last of two equal keys; the format forbids them, and which one a
    // reader takes is a guess, so they are refused here while the keys still stream past.
    std::vector<std::set<std::string>> keys_of_open_objects;
    std::string tensor;  // the top-level key being parsed, for the message
    const ordered_json::parser_callback_t check =
        [&](int depth, nlohmann::json::parse_event_t event, ordered_json& parsed) {
          using Event = nlohmann::json::parse_event_t;
          if (depth > kMaxHeaderDepth)
            fail(path, "header nests deeper than a safetensors header can");
          if (event == Event::object_start) {
            keys_of_open_objects.emplace_back();
          } else if (event == Event::object_end) {
            if (!keys_of_open_objects.empty()) keys_of_open_objects.pop_back();
          } else if (event == Event::key && !keys_of_open_objects.empty()) {
            const std::string key = parsed.get<std::string>();
            if (keys_of_open_objects.size() == 1) tensor = key;
            if (!keys_of_open_objects.back().insert(key).second) {
              if (keys_of_open_objects.size() == 1)
                fail(path, fmt::format("tensor '{}' appears twice in the header (duplicate keys are not allowed)", key));
              fail(path, fmt::format("tensor '{}': key '{}' appears twice in its entry", tensor, key));
            }
          }
          return true;
        };
    header = ordered_json::parse(text, text + header_bytes, check);
  } catch (const nlohmann::json::parse_error& e) {
    fail(path, fmt::format("header is not valid JSON (byte {}): {}", e.byte, json_error_text(e)));
  }
  if (!header.is_object()) fail(path, "header is not a JSON object");

  const std::byte* data = bytes.data() + 8 + header_bytes;
  const uint64_t data_bytes = bytes.size() - 8 - header_bytes;
  tensors_.reserve(header.size());
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail(path, "__metadata__ is not a JSON object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          fail(path, fmt::format("__metadata__ value for '{}' is not a string", mk));
        metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    index_.emplace(key, tensors_.size());
    tensors_.push_back(parse_tensor_entry(path, key, value, data_bytes, data));
  }
  check_data_layout(path, tensors_, data, data_bytes);
}

const TensorEntry* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorEntry& SafetensorsFile::at(std::string_view name) const {
  const TensorEntry* t = find(name);
  if (!t) fail(path(), fmt::format("no tensor '{}'", name));
  return *t;
}

uint64_t safetensors_data_bytes(std::span<const TensorToWrite> tensors, DType out_dtype) {
  uint64_t total = 0;
  for (const auto& t : tensors) total += tensor_numel(t) * dtype_size(out_dtype);
  return total;
}

void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                       DType out_dtype, const SafetensorsMetadata& metadata) {
  check_tensors_to_write(path, tensors, out_dtype);
  const std::string header = build_header(tensors, out_dtype, metadata);
  const uint64_t header_bytes = header.size();
  std::byte length[8];
  std::memcpy(length, &header_bytes, 8);

  AtomicFileWriter out(path);
  out.write(std::span<const std::byte>(length, 8));
  out.write(header);
  std::vector<uint16_t> chunk;
  for (const auto& t : tensors) write_tensor_data(out, t, out_dtype, chunk);
  out.commit();
}

std::vector<std::filesystem::path> write_safetensors_sharded(
    const std::filesystem::path& dir, std::span<const TensorToWrite> tensors, DType out_dtype,
    uint64_t max_shard_bytes, const SafetensorsMetadata& metadata) {
  check_tensors_to_write(dir, tensors, out_dtype);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    throw Error(kSafetensorsComponent, fmt::format("{}: cannot create directory: {}", dir.string(),
                                        ec.message()));

  std::vector<uint64_t> bytes;
  std::vector<std::string> names;
  for (const TensorToWrite& t : tensors) {
    bytes.push_back(tensor_numel(t) * dtype_size(out_dtype));
    names.push_back(t.name);
  }
  const std::vector<std::filesystem::path> written =
      write_weight_files(dir, bytes, names, max_shard_bytes, [&](const std::filesystem::path& path, size_t first, size_t last) {
        write_safetensors(path, tensors.subspan(first, last - first), out_dtype, metadata);
      });
  remove_stale_weight_files(dir, written);
  return written;
}

std::vector<std::filesystem::path> write_weight_files(
    const std::filesystem::path& dir, std::span<const uint64_t> tensor_bytes, std::span<const std::string> names,
    uint64_t max_shard_bytes,
    const std::function<void(const std::filesystem::path&, size_t first, size_t last)>& write_file) {
  uint64_t total_bytes = 0;
  for (uint64_t b : tensor_bytes) total_bytes += b;
  std::vector<std::filesystem::path> written;
  if (total_bytes <= max_shard_bytes) {
    written.push_back(dir / "model.safetensors");
    write_file(written.back(), 0, tensor_bytes.size());
    return written;
  }
  // Greedy, in order: a shard takes tensors until the next would overflow it.
  std::vector<std::pair<size_t, size_t>> shards;  // [first, last) tensor index
  uint64_t shard_bytes = 0;
  for (size_t i = 0; i < tensor_bytes.size(); ++i) {
    if (shards.empty() || (shard_bytes > 0 && shard_bytes + tensor_bytes[i] > max_shard_bytes)) {
      shards.emplace_back(i, i);
      shard_bytes = 0;
    }
    shards.back().second = i + 1;
    shard_bytes += tensor_bytes[i];
  }
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const auto [first, last] = shards[s];
    const std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
    written.push_back(dir / name);
    write_file(written.back(), first, last);
    for (size_t i = first; i < last; ++i) weight_map[names[i]] = name;
  }
  nlohmann::json index;
  index["metadata"] = {{"total_size", total_bytes}};
  index["weight_map"] = std::move(weight_map);
  written.push_back(dir / "model.safetensors.index.json");
  write_file_atomic(written.back(), index.dump(2) + "\n");
  return written;
}

}  // namespace flotilla::io
