#include "flotilla/model/matmul_dtype.hpp"

#include <atomic>

#include "flotilla/base/log.hpp"

namespace flotilla::model {

std::optional<kernels::GemmInput> parse_matmul_dtype(std::string_view name) {
  if (name == "float32" || name == "f32") return kernels::GemmInput::f32;
  if (name == "bf16" || name == "bfloat16") return kernels::GemmInput::bf16;
  return std::nullopt;
}

std::string_view matmul_dtype_name(kernels::GemmInput input) {
  return input == kernels::GemmInput::bf16 ? "bf16" : "float32";
}

kernels::GemmInput resolve_matmul_dtype(kernels::GemmInput requested) {
  if (requested != kernels::GemmInput::bf16 || kernels::gemm_bf16_supported()) return requested;
  // A log line, once per process: not state anyone reads back.
  static std::atomic<bool> said{false};
  if (!said.exchange(true))
    log::warn("--dtype bf16: this CPU has no bf16 matrix products in oneDNN (it needs AVX-512; oneDNN runs {} here): "
              "computing in float32",
              kernels::gemm_engine_info().isa);
  return kernels::GemmInput::f32;
}

}  // namespace flotilla::model
