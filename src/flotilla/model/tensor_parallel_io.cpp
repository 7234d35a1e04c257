#include "flotilla/model/tensor_parallel_io.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/io/tensor_store.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/model/quantized_view.hpp"
#include "flotilla/model/tensor_parallel.hpp"

namespace flotilla::model {

namespace {
// The weights a directory stores quantized: those with a P.scales beside P.weight, as
// Llama::load decides (config.json says how, the tensors say which).
std::set<std::string> tp_quantized_names(const io::TensorStore& store, const ModelConfig& full,
                                         const std::filesystem::path& dir) {
  std::set<std::string> quantized;
  const ParamLayout layout(full);
  for (const ParamInfo& info : layout.params())
    if (info.decay && info.shape.size() == 2 && store.has(module_of(info.name) + ".scales")) quantized.insert(info.name);
  if (!quantized.empty() && !full.quantization)
    throw InputError("model", fmt::format("{}: {} has .scales (a quantized weight) but config.json has no \"quantization\"",
                                          dir.string(), *quantized.begin()));
  if (quantized.empty() && full.quantization)
    throw InputError("model", fmt::format("{}: config.json has \"quantization\" but no weight has .scales and .biases: "
                                          "the quantization config does not match the tensors", dir.string()));
  return quantized;
}

// m's three tensors copied into one owned buffer (packed words, scales, biases).
QuantSlice copy_quantized(const QuantMatrix& m) {
  const auto esz = static_cast<int64_t>(dtype_size(m.scale_dtype));
  const int64_t packed_bytes = m.rows * m.words_per_row() * 4, group_bytes = m.rows * m.groups_per_row() * esz;
  auto owned = std::make_shared<std::vector<std::byte>>(static_cast<size_t>(packed_bytes + 2 * group_bytes));
  std::byte* base = owned->data();
  std::memcpy(base, m.packed, static_cast<size_t>(packed_bytes));
  std::memcpy(base + packed_bytes, m.scales, static_cast<size_t>(group_bytes));
  std::memcpy(base + packed_bytes + group_bytes, m.biases, static_cast<size_t>(group_bytes));
  QuantMatrix copy = m;
  copy.packed = base;
  copy.scales = base + packed_bytes;
  copy.biases = base + packed_bytes + group_bytes;
  return {copy, std::move(owned)};
}

// Tp rank `at`'s slice of quantized tensor `info` into `local`'s next slot, copied out of
// the mapped file (a row slice: its rows' bytes only; a column slice, o and down: each
// row's groups of the rank's columns), after which the tensor's pages leave the resident
// set: a rank holds its slices and nothing else of the file. (Views into the map held
// more: the kernel maps a file's cached pages around a fault, in large folios on ext4 and
// Linux 6.18, and a rank's resident q_proj and up_proj rows measured 1.7x and 1.4x their
// bytes on bench/tp_quantized_memory.sh's model.) The non-finite check covers the scales
// and biases the rank reads.
void add_quantized_slice(Llama& local, const ParamInfo& info, const ParamInfo& mine, TpRank at, const ModelConfig& full,
                         const io::TensorStore& store) {
  // Its three tensors' shapes and dtypes checked on every rank, held or not (the header
  // only): a fault is every rank's error.
  const QuantMatrix whole = quantized_view(store, info, full, /*check_values=*/false);
  if (!local.holds(mine)) {  // another pipeline stage's: shaped, no bytes
    QuantMatrix absent = whole;
    absent.rows = mine.shape[0];
    absent.cols = mine.shape[1];
    absent.packed = absent.scales = absent.biases = nullptr;
    local.add_quantized_matrix(absent, nullptr, false);
    return;
  }
  QuantSlice slice = slice_quantized(whole, info, mine, at);
  const std::string module = module_of(info.name);
  const io::TensorEntry& scales = store.info(module + ".scales");
  const io::TensorEntry& biases = store.info(module + ".biases");
  if (slice.owned) {  // columns: every row's groups were read
    store.check_finite(scales);
    store.check_finite(biases);
  } else {  // rows [first row, ...): their groups
    const auto esz = static_cast<int64_t>(dtype_size(whole.scale_dtype));
    const int64_t first = (slice.matrix.scales - whole.scales) / esz;
    const int64_t count = slice.matrix.rows * slice.matrix.groups_per_row();
    store.check_finite(scales, first, count);
    store.check_finite(biases, first, count);
    slice = copy_quantized(slice.matrix);
  }
  drop_file_pages(whole.packed, static_cast<size_t>(whole.rows * whole.words_per_row() * 4));
  drop_file_pages(scales.bytes.data(), scales.bytes.size());
  drop_file_pages(biases.bytes.data(), biases.bytes.size());
  local.add_quantized_matrix(slice.matrix, std::move(slice.owned), false);
}
}  // namespace

Llama load_tensor_parallel(const std::filesystem::path& dir, io::NonFinitePolicy non_finite, int tp, int rank,
                           std::optional<Llama::LayerRange> stage, std::span<const ElementRange> shard) {
  if (!std::filesystem::is_directory(dir)) throw InputError("model", dir.string() + ": not a model directory");
  const ModelConfig full = ModelConfig::load(dir / "config.json");
  const TpRank at{rank, tp};
  const ModelConfig local_cfg = tensor_parallel_config(full, at);
  const io::TensorStore store(dir, non_finite);
  const std::set<std::string> quantized = tp_quantized_names(store, full, dir);
  Llama local = Llama::with_quantized(local_cfg, quantized);
  if (stage) local.hold_only(*stage);
  const ParamLayout full_layout(full, quantized);
  const std::span<float> params = local.params();
  std::vector<float> scratch;  // (numel) one full tensor
  for (const ParamInfo& info : full_layout.params()) {
    const ParamInfo& mine = *local.layout().find(info.name);
    if (info.quantized) {
      add_quantized_slice(local, info, mine, at, full, store);
      continue;
    }
    if (!local.holds(mine)) continue;  // another stage's
    ParamInfo at0 = info;  // the scratch holds the tensor from its element 0
    at0.offset = 0;
    // ZeRO-3 x tp: only the pieces of the slice inside this rank's shard; a tensor with
    // none is not read.
    std::vector<std::array<int64_t, 3>> pieces;
    for_each_slice_piece(at0, mine, at, shard, [&](int64_t f, int64_t l, int64_t n) { pieces.push_back({f, l, n}); });
    if (pieces.empty()) continue;
    scratch.resize(static_cast<size_t>(info.numel));
    store.read_f32(info.name, scratch, info.shape);
    for (const auto& [f, l, n] : pieces) std::copy_n(scratch.begin() + f, n, params.begin() + l);
  }
  // As Llama::load: tensors not used (rotary caches, a tied lm_head's copy) pass; any
  // other means another architecture than config.json says.
  for (const std::string& name : store.names()) {
    if (full_layout.find(name)) continue;
    const auto dot = name.rfind('.');
    if (dot != std::string::npos && (name.ends_with(".scales") || name.ends_with(".biases")) &&
        quantized.count(name.substr(0, dot) + ".weight"))
      continue;
    const bool harmless = name.ends_with("rotary_emb.inv_freq") || (full.tie_embeddings && name == "lm_head.weight");
    if (!harmless)
      throw InputError("model", fmt::format("{}: unexpected tensor '{}' for a {} model", dir.string(), name,
                                            architecture_name(full.arch)));
  }
  return local;
}

}  // namespace flotilla::model
