// Reduction operators and their elementwise kernels on host memory. Backends that reduce
// themselves (thread) use these; MPI uses its own operators. An average is always a sum
// followed by divide(), done once in Communicator, so backends implement sum and max only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "flotilla/comm/buffer_view.hpp"

namespace flotilla::comm {

enum class ReduceOp : uint8_t { sum, avg, max };

std::string_view reduce_name(ReduceOp op);  // "sum", "avg", "max"

// sum and max: every type but f16/bf16 (summing halves in halves loses the gradient;
// reduce in f32). avg: f32 and f64 only (an integer average would silently truncate).
bool reduction_supported(ElementType type, ReduceOp op);

// acc[i] = acc[i] (+ or max) src[i] for i < count; op is sum or max. Integer sums wrap
// modulo 2^bits, as MPI's do.
void reduce_into(ElementType type, ReduceOp op, std::byte* acc, const std::byte* src,
                 size_t count);

// data[i] /= divisor for f32 and f64: the second half of an average.
void divide(ElementType type, std::byte* data, size_t count, int divisor);

}  // namespace flotilla::comm
