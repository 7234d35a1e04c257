// SwiGLU activation of the Llama MLP: out = silu(gate) * up, silu(x) = x * sigmoid(x).
#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/kernels/vec_math.hpp"

namespace flotilla::kernels {

FLOTILLA_KERNEL void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t F) {
  // out, gate, up (N, F)
  const int64_t n = N * F;
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float sig = 1.0f / (1.0f + detail::exp_approx(-g));
    out[i] = g * sig * up[i];
  }
}

FLOTILLA_KERNEL void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N, int64_t F) {
  // dgate, dup (N, F) overwritten; dout, gate, up (N, F)
  // forward: out = g * s(g) * u  =>  dup = dout * g * s(g),
  //          dgate = dout * u * s(g) * (1 + g * (1 - s(g)))   since (g s)' = s + g s (1 - s)
  const int64_t n = N * F;
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float sig = 1.0f / (1.0f + detail::exp_approx(-g));
    const float dy = dout[i];
    dup[i] = dy * g * sig;
    dgate[i] = dy * up[i] * sig * (1.0f + g * (1.0f - sig));
  }
}

}  // namespace flotilla::kernels
