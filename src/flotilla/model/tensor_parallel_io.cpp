#include "flotilla/model/tensor_parallel_io.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/io/tensor_store.hpp"
#include "flotilla/model/tensor_parallel.hpp"

namespace flotilla::model {

Llama load_tensor_parallel(const std::filesystem::path& dir, io::NonFinitePolicy non_finite, int tp, int rank,
                           std::optional<Llama::LayerRange> stage, std::span<const ElementRange> shard) {
  if (!std::filesystem::is_directory(dir)) throw InputError("model", dir.string() + ": not a model directory");
  const ModelConfig full = ModelConfig::load(dir / "config.json");
  if (full.quantization)
    throw InputError("model", fmt::format("{}: tensor parallelism (tp={}) does not split quantized (4-bit) weights yet",
                                          dir.string(), tp));
  Llama local(tensor_parallel_config(full, {rank, tp}));
  if (stage) local.hold_only(*stage);
  const io::TensorStore store(dir, non_finite);
  const ParamLayout full_layout(full);
  const std::span<float> params = local.params();
  std::vector<float> scratch;  // (numel) one full tensor
  for (const ParamInfo& info : full_layout.params()) {
    const ParamInfo& mine = *local.layout().find(info.name);
    if (!local.holds(mine)) continue;  // another stage's
    ParamInfo at0 = info;  // the scratch holds the tensor from its element 0
    at0.offset = 0;
    // ZeRO-3 x tp: only the pieces of the slice inside this rank's shard; a tensor with
    // none is not read.
    std::vector<std::array<int64_t, 3>> pieces;
    for_each_slice_piece(at0, mine, {rank, tp}, shard,
                         [&](int64_t f, int64_t l, int64_t n) { pieces.push_back({f, l, n}); });
    if (pieces.empty()) continue;
    scratch.resize(static_cast<size_t>(info.numel));
    store.read_f32(info.name, scratch, info.shape);
    for (const auto& [f, l, n] : pieces) std::copy_n(scratch.begin() + f, n, params.begin() + l);
  }
  // As Llama::load: tensors not used (rotary caches, a tied lm_head's copy) pass; any
  // other means another architecture than config.json says.
  for (const std::string& name : store.names()) {
    if (full_layout.find(name)) continue;
    const bool harmless = name.ends_with("rotary_emb.inv_freq") || (full.tie_embeddings && name == "lm_head.weight");
    if (!harmless)
      throw InputError("model", fmt::format("{}: unexpected tensor '{}' for a {} model", dir.string(), name,
                                            architecture_name(full.arch)));
  }
  return local;
}

}  // namespace flotilla::model
