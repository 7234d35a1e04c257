// A tensor-parallel rank's model read from a Hugging Face directory (model/tensor_parallel.hpp
// says what a rank holds): its slices only, one tensor at a time.
#pragma once

#include <filesystem>
#include <optional>

#include "flotilla/io/non_finite.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::model {

// tp rank `rank`'s local model of the directory's model: each tensor is read into a
// scratch the size of that one tensor and the rank's slice kept, so no rank holds the
// whole model (at most its largest tensor besides its own slices). The directory's faults
// are reported as Llama::load reports them (an unexpected tensor, non-finite values by
// `non_finite`); InputError for a tp that does not divide the model
// (tensor_parallel_config). A quantized (MLX-layout) directory's matrices are sliced as
// model/tensor_parallel.hpp's QuantSlice says and copied out of the mapped file (a row
// slice reads only its rows' bytes, a column slice of o or down every row's), whose pages
// of that matrix are then handed back: a rank holds its slices of the packed base only. `stage` (pp x tp): only that pipeline stage's tensors are
// read (Llama::hold_only), the others never touched. `shard` (ZeRO-3 x tp: ranges of the
// local arena, ascending; empty: all): only the floats inside it are written.
Llama load_tensor_parallel(const std::filesystem::path& dir, io::NonFinitePolicy non_finite, int tp, int rank,
                           std::optional<Llama::LayerRange> stage = std::nullopt,
                           std::span<const ElementRange> shard = {});

}  // namespace flotilla::model
