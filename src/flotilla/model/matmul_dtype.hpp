// The number format of the model's matrix products, as users name it (--dtype), and the
// format this machine can run: bf16 needs oneDNN's bf16 matmul (AVX-512 and up); elsewhere
// the products stay float32 and the log says so once.
#pragma once

#include <optional>
#include <string_view>

#include "flotilla/kernels/gemm.hpp"

namespace flotilla::model {

// "float32" or "bf16" (also "f32", "bfloat16"); nullopt for anything else.
std::optional<kernels::GemmInput> parse_matmul_dtype(std::string_view name);
// "float32" / "bf16", as --dtype spells them.
std::string_view matmul_dtype_name(kernels::GemmInput input);

// `requested`, or float32 where this CPU has no bf16 matmul: then one warning line in the
// log, the first time only (a process that builds several models says it once).
kernels::GemmInput resolve_matmul_dtype(kernels::GemmInput requested);

}  // namespace flotilla::model
