// A tensor-parallel rank's model read from a Hugging Face directory (model/tensor_parallel.hpp
// says what a rank holds): its slices only, one tensor at a time.
#pragma once

#include <filesystem>

#include "flotilla/io/non_finite.hpp"
#include "flotilla/model/llama.hpp"

namespace flotilla::model {

// tp rank `rank`'s local model of the directory's model: each tensor is read into a
// scratch the size of that one tensor and the rank's slice kept, so no rank holds the
// whole model (at most its largest tensor besides its own slices). The directory's faults
// are reported as Llama::load reports them (an unexpected tensor, non-finite values by
// `non_finite`); InputError for a quantized directory, or a tp that does not divide the
// model (tensor_parallel_config).
Llama load_tensor_parallel(const std::filesystem::path& dir, io::NonFinitePolicy non_finite, int tp, int rank);

}  // namespace flotilla::model
