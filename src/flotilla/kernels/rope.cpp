// Rotary position embeddings, Hugging Face Llama layout (rotate_half): in a head of size hd,
// element i (i < hd/2) pairs with element i + hd/2 and the pair turns by pos * inv_freq[i].
//
// Matching Hugging Face to the last bit where it is cheap:
// - inv_freq follows transformers' float32 arithmetic: exponent 2i/hd rounded to float,
//   theta^exponent (evaluated in double, rounded to float), then 1/x in float; the Llama 3
//   scaling repeats _compute_llama3_parameters' float32 steps in the same order.
// - angles: HF computes freqs = inv_freq (float32) * position (float32) as a float32
//   product and then cos/sin of that float32 angle. We form the same float32 product (so
//   long positions carry the same rounding of the angle as HF, which matters: at position
//   8000 one ulp of the angle is ~0.5e-3 rad) and evaluate cos/sin of it in double, rounded
//   to float: at most half an ulp from the exact cosine of HF's angle, where torch's float
//   cos is within about one ulp.
#include <cmath>
#include <numbers>

#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::kernels {

void rope_inv_freq(float* inv_freq, int64_t hd, float theta, const RopeScaling& scaling) {
  // inv_freq (hd/2)
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(hd);
    const float power = static_cast<float>(std::pow(static_cast<double>(theta), exponent));
    inv_freq[i] = 1.0f / power;
  }
  if (scaling.factor <= 0.0f) return;
  // Llama 3: high frequencies (short wavelengths) are kept, low frequencies are slowed down
  // by `factor`, and the band between is a linear blend in 1/wavelength.
  const float factor = scaling.factor;
  const float low = scaling.low_freq_factor, high = scaling.high_freq_factor;
  const float old_len = static_cast<float>(scaling.original_max_position);
  const float low_freq_wavelen = old_len / low;
  const float high_freq_wavelen = old_len / high;
  for (int64_t i = 0; i < half; ++i) {
    const float inv = inv_freq[i];
    const float wavelen = static_cast<float>(2.0 * std::numbers::pi) / inv;
    if (wavelen < high_freq_wavelen) continue;
    if (wavelen > low_freq_wavelen) {
      inv_freq[i] = inv / factor;
      continue;
    }
    const float smooth = (old_len / wavelen - low) / (high - low);
    inv_freq[i] = (1.0f - smooth) * inv / factor + smooth * inv;
  }
}

void rope_table(float* cos, float* sin, const float* inv_freq, int64_t pos0, int64_t T,
                int64_t hd) {
  // cos, sin (T, hd/2), inv_freq (hd/2)
  const int64_t half = hd / 2;
#pragma omp parallel for schedule(static) if (T * half > (1 << 14))
  for (int64_t t = 0; t < T; ++t) {
    const float pos = static_cast<float>(pos0 + t);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];  // float32 product, as HF
      cos[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
}

namespace {
// In place on x (B, T, NH, hd): turns each (x1[i], x2[i]) pair by `direction` x angle,
// direction +1 (forward) or -1 (backward: a rotation's transpose is the opposite turn).
FLOTILLA_KERNEL void rotate_pairs(float* x, const float* cos, const float* sin, int64_t B, int64_t T, int64_t NH, int64_t hd,
                  const int32_t* positions, float direction) {
  const int64_t half = hd / 2;
#pragma omp parallel for schedule(static) if (B * T * NH * hd > (1 << 15))
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const int64_t pos = positions ? positions[bt] : bt % T;
    const float* c = cos + pos * half;
    const float* s = sin + pos * half;
    for (int64_t h = 0; h < NH; ++h) {
      float* x1 = x + (bt * NH + h) * hd;
      float* x2 = x1 + half;
      // x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), sin signed by direction
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = x1[i], b = x2[i], si = direction * s[i];
        x1[i] = a * c[i] - b * si;
        x2[i] = b * c[i] + a * si;
      }
    }
  }
}
}  // namespace

void rope_forward(float* x, const float* cos, const float* sin, int64_t B, int64_t T, int64_t NH,
                  int64_t hd, const int32_t* positions) {
  // x (B, T, NH, hd) in place, cos/sin (T, hd/2)
  rotate_pairs(x, cos, sin, B, T, NH, hd, positions, 1.0f);
}

void rope_backward(float* dx, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t NH, int64_t hd, const int32_t* positions) {
  // dx (B, T, NH, hd) in place: holds dout on entry, dinp on exit; cos/sin (T, hd/2).
  // forward: (y1, y2) = (x1 c - x2 s, x2 c + x1 s), a rotation by +angle; its transpose
  // turns by -angle: (dx1, dx2) = (dy1 c + dy2 s, dy2 c - dy1 s).
  rotate_pairs(dx, cos, sin, B, T, NH, hd, positions, -1.0f);
}

}  // namespace flotilla::kernels
