#include "flotilla/io/safetensors_stream.hpp"

#include <fmt/format.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"

namespace flotilla::io {
namespace {
constexpr std::string_view kSafetensorsStreamComponent = "io/safetensors";

void write_one_file(const std::filesystem::path& path, std::span<const TensorSpec> specs, size_t first_index,
                    const TensorWriteFn& write_tensor, const SafetensorsMetadata& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  if (!meta.contains("format")) meta["format"] = "pt";
  header["__metadata__"] = std::move(meta);
  uint64_t offset = 0;
  for (const TensorSpec& t : specs) {
    nlohmann::ordered_json entry;
    entry["dtype"] = std::string(dtype_name(t.dtype));
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + t.bytes()};
    offset += t.bytes();
    header[t.name] = std::move(entry);
  }
  std::string text = header.dump();
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');  // data section 8-byte aligned
  const uint64_t header_bytes = text.size();
  std::byte length[8];
  std::memcpy(length, &header_bytes, 8);

  AtomicFileWriter out(path);
  out.write(std::span<const std::byte>(length, 8));
  out.write(text);
  for (size_t i = 0; i < specs.size(); ++i) {
    TensorSink sink(out);
    write_tensor(first_index + i, sink);
    if (sink.written() != specs[i].bytes())
      throw Error(kSafetensorsStreamComponent, fmt::format("{}: tensor '{}' got {} bytes, its header says {}", path.string(),
                                          specs[i].name, sink.written(), specs[i].bytes()));
  }
  out.commit();
}
}  // namespace

uint64_t TensorSpec::bytes() const {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::vector<std::filesystem::path> write_safetensors_streamed(const std::filesystem::path& dir,
                                                              std::span<const TensorSpec> specs,
                                                              uint64_t max_shard_bytes,
                                                              const TensorWriteFn& write_tensor,
                                                              const SafetensorsMetadata& metadata) {
  std::vector<uint64_t> bytes;
  std::vector<std::string> names;
  for (const TensorSpec& t : specs) {
    bytes.push_back(t.bytes());
    names.push_back(t.name);
  }
  return write_weight_files(dir, bytes, names, max_shard_bytes,
                            [&](const std::filesystem::path& path, size_t first, size_t last) {
                              write_one_file(path, specs.subspan(first, last - first), first, write_tensor, metadata);
                            });
}

}  // namespace flotilla::io
