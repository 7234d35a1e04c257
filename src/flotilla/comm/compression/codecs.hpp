// The codecs behind make_gradient_codec (gradient_codec.hpp), one file each.
#pragma once

#include "flotilla/comm/compression/gradient_codec.hpp"

namespace flotilla::comm::detail {

// Every element in `dtype` (fp16, bf16 or int8), reported as codec `kind`.
std::unique_ptr<GradientCodec> make_dense_codec(Compression kind, WireDtype dtype, int64_t n);
std::unique_ptr<GradientCodec> make_topk_codec(int64_t n, double density, const std::vector<MatrixShape>& tensors,
                                               WireDtype dtype);
std::unique_ptr<GradientCodec> make_powersgd_codec(int64_t n, std::vector<MatrixShape> matrices, int rank,
                                                   uint64_t seed, WireDtype dtype);

}  // namespace flotilla::comm::detail
