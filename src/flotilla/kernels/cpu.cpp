// What the CPU offers and which kernel variant the loader chose (flotilla doctor prints both).
#include <string>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {
namespace {

#if FLOTILLA_KERNEL_CLONES
// Function multiversioning with the same targets as FLOTILLA_KERNEL: the loader's resolver
// picks this function's variant by the same rule as every kernel's, so its answer is the
// variant the kernels run, not a guess made beside it.
__attribute__((target("default"))) const char* chosen_variant() { return "avx2"; }
__attribute__((target("arch=x86-64-v4"))) const char* chosen_variant() { return "avx512"; }
#elif defined(__x86_64__) && defined(__AVX512F__)
const char* chosen_variant() { return "native"; }
#else
const char* chosen_variant() { return "generic"; }
#endif

}  // namespace

std::string cpu_features() {
  std::string out;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const auto add = [&out](bool has, const char* name) {
    if (!has) return;
    if (!out.empty()) out += ' ';
    out += name;
  };
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bf16"), "avx512_bf16");
  add(__builtin_cpu_supports("amx-tile"), "amx");
#endif
  return out;
}

std::string kernel_isa() { return chosen_variant(); }

}  // namespace flotilla::kernels
