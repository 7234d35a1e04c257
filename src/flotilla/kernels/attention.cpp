// Causal scaled dot-product attention with grouped-query attention, directly on the
// (B, T, heads, hd) layout that the QKV projections produce: each (batch, head) slice is a
// strided matrix (leading dimension heads*hd), which oneDNN reads in place, so nothing is
// transposed or copied.
//
// Vocabulary: a *query block* is kBlock consecutive query rows of one (b, h); a *key block*
// is kBlock consecutive key rows of one (b, kv head). Work is cut into blocks for two
// reasons: causality (query block [r0, r1) only needs keys [0, r1 + off), so the GEMMs skip
// most of the masked upper triangle, leaving 1/(number of blocks) of waste instead of half)
// and load balance (many independent tasks for the OpenMP loop; dynamic schedule because
// later query blocks see more keys).
//
// Threads: each task calls gemm() inside an OpenMP parallel region, where oneDNN runs on
// the calling thread alone; the parallelism is ours. For a fixed sequence length the
// products have a handful of shapes (rows x visible keys per query block), each a cached
// primitive; one-row decoding steps take gemm()'s primitive-free path.
//
// Number format (GemmInput): float32, or bf16 products with float32 accumulation (--dtype
// bf16). In bf16, q, k, v and dout are rounded once per call; forward's tasks round the P
// block of their second product into a per-thread scratch, and backward's first phase
// writes each row's dS and P rounded once into the scratch argument (which holds a float
// row's bytes, so room for both), which the second phase's products read as they are. The
// softmax, its backward and every sum stay float32, as do probs (saved for backward) and
// the outputs.
// Decoding steps (fewer than kGemmPrimitiveMinRows new queries behind a cache) stay float32:
// a new key count every token would cost a bf16 primitive per token, and there is no
// primitive-free bf16 path.

#include <algorithm>
#include <cmath>

#include "flotilla/base/buffer.hpp"
#include "flotilla/kernels/dispatch.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/kernels/vec_math.hpp"
#include "flotilla/tensor/dtype.hpp"

namespace flotilla::kernels {
namespace {

constexpr int64_t kBlock = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The end of the zeros a row whose last visible key is lim needs after lim: up to the end of
// its query block's keys (kend, read by the block's products) and of lim's key block (read
// by the backward's key-block products). The rest of the row, the masked upper triangle,
// is never read and never written: that is half of the (B, NH, Tq, Tk) buffer's bytes.
int64_t masked_zeros_end(int64_t lim, int64_t kend, int64_t n) {
  return std::min(n, std::max(kend, (lim + 1 + kBlock - 1) / kBlock * kBlock));
}

// p (n) holds scores in p[first .. lim] on entry; on exit softmax over p[first .. lim] and
// zeros in p[0 .. first) and p(lim .. zend); p[zend .. n) is left as it was.
FLOTILLA_KERNEL void causal_softmax_row(float* p, int64_t first, int64_t lim, int64_t zend) {
  float mx = p[first];
  // A conditional, not std::max: GCC 12 vectorises the std::max form ~10x slower.
#pragma omp simd reduction(max : mx)
  for (int64_t j = first; j <= lim; ++j) mx = p[j] > mx ? p[j] : mx;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = first; j <= lim; ++j) {
    const float e = detail::exp_approx(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = first; j <= lim; ++j) p[j] *= inv;
  std::fill(p, p + first, 0.0f);
  std::fill(p + lim + 1, p + zend, 0.0f);
}

// The first key any query of rows [r0, r1) of batch row b may see, rounded down to a key
// block: the keys in between are masked (zero probabilities, zero dS), and the rounding
// keeps the products to a few shapes per sequence length, each one cached primitive,
// instead of a new shape for every document boundary of a packed batch.
int64_t block_key_begin(const int32_t* key_start, int64_t b, int64_t Tq, int64_t r0, int64_t r1) {
  if (!key_start) return 0;
  int64_t first = key_start[b * Tq + r0];
  for (int64_t t = r0 + 1; t < r1; ++t) first = std::min<int64_t>(first, key_start[b * Tq + t]);
  return first / kBlock * kBlock;
}


// The bf16 copies of one call's whole operands (nullptr in float32), made once per call on
// the calling thread into buffers it keeps: a step calls attention with the same shapes
// layer after layer.
struct AttentionBf16 {
  const uint16_t *q = nullptr, *k = nullptr, *v = nullptr, *dout = nullptr;
};
thread_local Buffer<uint16_t> attention_bf16_q, attention_bf16_k, attention_bf16_v, attention_bf16_dout;

const uint16_t* attention_round(Buffer<uint16_t>& buf, const float* x, int64_t n) {
  if (static_cast<size_t>(n) > buf.size()) buf.resize(static_cast<size_t>(n));
  convert_to_bf16(x, n, buf.data());
  return buf.data();
}

// Whether a call's products run in bf16: asked for, and not a decoding step (see top).
bool attention_in_bf16(GemmInput input, int64_t Tq, int64_t Tk) {
  return input == GemmInput::bf16 && (Tq == Tk || Tq >= kGemmPrimitiveMinRows) && gemm_bf16_supported();
}

// Per-thread scratch for the rounded P and dS blocks of a task's bf16 products.
thread_local Buffer<uint16_t> attention_block_p, attention_block_s;

// The (rows, cols) block x (leading dimension ld) rounded to bf16 into scratch, leading
// dimension cols.
FLOTILLA_KERNEL const uint16_t* attention_round_block(Buffer<uint16_t>& scratch, const float* x, int64_t rows, int64_t cols,
                                      int64_t ld) {
  if (static_cast<size_t>(rows * cols) > scratch.size()) scratch.resize(static_cast<size_t>(rows * cols));
  uint16_t* out = scratch.data();
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = x + i * ld;
    uint16_t* o = out + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] = f32_to_bf16(row[j]);
  }
  return out;
}

// Per-thread float block for backward's dP in bf16 (the float32 path writes it into scratch).
thread_local Buffer<float> attention_block_dp;

float* attention_dp_block(int64_t n) {
  if (static_cast<size_t>(n) > attention_block_dp.size()) attention_block_dp.resize(static_cast<size_t>(n));
  return attention_block_dp.data();
}

// One query row of backward in bf16: dS = P * (dP - rowsum(dP * P)) over keys [first, lim],
// written rounded to bf16 into ds, and P rounded into p_out; both zero in [0, first) and
// (lim, zend), as the float32 path zeroes its rows (phase 2 reads whole key blocks).
// dp holds keys [kbeg, lim] (kbeg <= first); p (Tk) is the row of the saved probs.
FLOTILLA_KERNEL void attention_ds_row_bf16(uint16_t* ds, uint16_t* p_out, const float* p, const float* dp,
                                           int64_t kbeg, int64_t first, int64_t lim, int64_t zend) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = first; j <= lim; ++j) dot += p[j] * dp[j - kbeg];
#pragma omp simd
  for (int64_t j = first; j <= lim; ++j) {
    ds[j] = f32_to_bf16(p[j] * (dp[j - kbeg] - dot));
    p_out[j] = f32_to_bf16(p[j]);
  }
  std::fill(ds, ds + first, uint16_t{0});
  std::fill(ds + lim + 1, ds + zend, uint16_t{0});
  std::fill(p_out, p_out + first, uint16_t{0});
  std::fill(p_out + lim + 1, p_out + zend, uint16_t{0});
}

}  // namespace

FLOTILLA_KERNEL void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v,
                       int64_t B, int64_t Tq, int64_t Tk, int64_t NH, int64_t NKV, int64_t hd,
                       const int32_t* key_start, GemmInput input) {
  // out (B, Tq, NH, hd), probs (B, NH, Tq, Tk), q (B, Tq, NH, hd), k, v (B, Tk, NKV, hd)
  if (B == 0 || Tq == 0 || NH == 0 || hd == 0) return;
  AttentionBf16 bf;
  if (attention_in_bf16(input, Tq, Tk)) {
    bf.q = attention_round(attention_bf16_q, q, B * Tq * NH * hd);
    bf.k = attention_round(attention_bf16_k, k, B * Tk * NKV * hd);
    bf.v = attention_round(attention_bf16_v, v, B * Tk * NKV * hd);
  }
  const int64_t group = NH / NKV;  // query heads per kv head
  const int64_t off = Tk - Tq;     // query t sits at position t + off
  const int64_t ldq = NH * hd, ldkv = NKV * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t nqb = ceil_div(Tq, kBlock);
  const int64_t ntasks = B * NH * nqb;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < ntasks; ++task) {
    const int64_t b = task / (NH * nqb), h = task / nqb % NH, qb = task % nqb;
    const int64_t g = h / group;
    const int64_t r0 = qb * kBlock, r1 = std::min(Tq, r0 + kBlock);
    const int64_t kend = r1 + off;  // keys [kbeg, kend) are visible to some row of the block
    const int64_t kbeg = block_key_begin(key_start, b, Tq, r0, r1);
    const float* Q = q + (b * Tq + r0) * ldq + h * hd;   // (rows, hd), ld ldq
    const float* K = k + b * Tk * ldkv + g * hd;         // (Tk, hd), ld ldkv
    const float* V = v + b * Tk * ldkv + g * hd;         // (Tk, hd), ld ldkv
    float* P = probs + ((b * NH + h) * Tq + r0) * Tk;    // (rows, Tk), ld Tk
    float* O = out + (b * Tq + r0) * ldq + h * hd;       // (rows, hd), ld ldq
    const int64_t rows = r1 - r0, nkeys = kend - kbeg;
    // S = scale * Q @ K^T over the visible keys
    if (bf.q)
      gemm_bf16(Transpose::no, Transpose::yes, rows, nkeys, hd, scale, bf.q + (Q - q), ldq,
                bf.k + (K - k) + kbeg * ldkv, ldkv, false, P + kbeg, Tk);
    else
      gemm(Transpose::no, Transpose::yes, rows, nkeys, hd, scale, Q, ldq, K + kbeg * ldkv, ldkv, false,
           P + kbeg, Tk);
    for (int64_t t = r0; t < r1; ++t) {
      const int64_t first = key_start ? key_start[b * Tq + t] : 0;
      causal_softmax_row(P + (t - r0) * Tk, first, t + off, masked_zeros_end(t + off, kend, Tk));
    }
    // O = P @ V (entries of P outside each row's visible range are zero)
    if (bf.q)
      gemm_bf16(Transpose::no, Transpose::no, rows, hd, nkeys, 1.0f,
                attention_round_block(attention_block_p, P + kbeg, rows, nkeys, Tk), nkeys,
                bf.v + (V - v) + kbeg * ldkv, ldkv, false, O, ldq);
    else
      gemm(Transpose::no, Transpose::no, rows, hd, nkeys, 1.0f, P + kbeg, Tk, V + kbeg * ldkv, ldkv, false,
           O, ldq);
  }
}

FLOTILLA_KERNEL void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                        const float* q, const float* k, const float* v, const float* probs,
                        int64_t B, int64_t Tq, int64_t Tk, int64_t NH, int64_t NKV, int64_t hd,
                        const int32_t* key_start, GemmInput input) {
  // dq (B, Tq, NH, hd), dk, dv (B, Tk, NKV, hd), scratch (B, NH, Tq, Tk) holds dS,
  // dout (B, Tq, NH, hd), q, k, v as forward, probs (B, NH, Tq, Tk) from forward
  if (B == 0 || Tq == 0 || NH == 0 || hd == 0) return;
  AttentionBf16 bf;
  if (attention_in_bf16(input, Tq, Tk)) {
    bf.q = attention_round(attention_bf16_q, q, B * Tq * NH * hd);
    bf.k = attention_round(attention_bf16_k, k, B * Tk * NKV * hd);
    bf.v = attention_round(attention_bf16_v, v, B * Tk * NKV * hd);
    bf.dout = attention_round(attention_bf16_dout, dout, B * Tq * NH * hd);
  }
  const int64_t group = NH / NKV;
  const int64_t off = Tk - Tq;
  const int64_t ldq = NH * hd, ldkv = NKV * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // In bf16, each scratch row (Tk floats) holds the row's dS and P rounded to bf16 instead
  // (Tk of each, dS first): phase 1 writes them once, phase 2's products read them as they
  // are, with no second rounding pass over blocks it would read from memory as floats.
  uint16_t* const rounded = bf.q ? reinterpret_cast<uint16_t*>(scratch) : nullptr;
  const int64_t ldr = 2 * Tk;  // row stride of the rounded dS and P, in bf16 elements

  // Phase 1, per query block of one (b, h): dS into scratch, and dq, which only this task
  // writes.
  const int64_t nqb = ceil_div(Tq, kBlock);
  const int64_t nqtasks = B * NH * nqb;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < nqtasks; ++task) {
    const int64_t b = task / (NH * nqb), h = task / nqb % NH, qb = task % nqb;
    const int64_t g = h / group;
    const int64_t r0 = qb * kBlock, r1 = std::min(Tq, r0 + kBlock);
    const int64_t kend = r1 + off;
    const int64_t kbeg = block_key_begin(key_start, b, Tq, r0, r1);
    const int64_t rows = r1 - r0, nkeys = kend - kbeg;
    const float* dO = dout + (b * Tq + r0) * ldq + h * hd;      // (rows, hd)
    const float* K = k + b * Tk * ldkv + g * hd;                // (Tk, hd)
    const float* V = v + b * Tk * ldkv + g * hd;                // (Tk, hd)
    const float* P = probs + ((b * NH + h) * Tq + r0) * Tk;     // (rows, Tk)
    float* S = scratch + ((b * NH + h) * Tq + r0) * Tk;         // (rows, Tk)
    float* dQ = dq + (b * Tq + r0) * ldq + h * hd;              // (rows, hd)
    if (bf.q) {
      // dP (rows, nkeys) into a per-thread block; dS and P rounded into the scratch rows.
      uint16_t* Sr = rounded + ((b * NH + h) * Tq + r0) * ldr;  // (rows, Tk), ld ldr; P's at + Tk
      float* dP = attention_dp_block(rows * nkeys);
      gemm_bf16(Transpose::no, Transpose::yes, rows, nkeys, hd, 1.0f, bf.dout + (dO - dout), ldq,
                bf.v + (V - v) + kbeg * ldkv, ldkv, false, dP, nkeys);
      for (int64_t t = r0; t < r1; ++t) {
        const int64_t first = key_start ? key_start[b * Tq + t] : 0;
        attention_ds_row_bf16(Sr + (t - r0) * ldr, Sr + (t - r0) * ldr + Tk, P + (t - r0) * Tk,
                              dP + (t - r0) * nkeys, kbeg, first, t + off, masked_zeros_end(t + off, kend, Tk));
      }
      // forward: S = scale * Q @ K^T  =>  dQ += scale * dS @ K
      gemm_bf16(Transpose::no, Transpose::no, rows, hd, nkeys, scale, Sr + kbeg, ldr, bf.k + (K - k) + kbeg * ldkv,
                ldkv, true, dQ, ldq);
      continue;
    }
    // forward: O = P @ V  =>  dP = dO @ V^T
    gemm(Transpose::no, Transpose::yes, rows, nkeys, hd, 1.0f, dO, ldq, V + kbeg * ldkv, ldkv, false, S + kbeg,
         Tk);
    // forward: P = softmax(S)  =>  dS = P * (dP - rowsum(dP * P)); zero outside the
    // visible range (as far as masked_zeros_end) so that phase 2 can read whole key-block
    // columns.
    for (int64_t t = r0; t < r1; ++t) {
      const int64_t first = key_start ? key_start[b * Tq + t] : 0;
      const int64_t lim = t + off;
      const float* p = P + (t - r0) * Tk;
      float* s = S + (t - r0) * Tk;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = first; j <= lim; ++j) dot += p[j] * s[j];
#pragma omp simd
      for (int64_t j = first; j <= lim; ++j) s[j] = p[j] * (s[j] - dot);
      std::fill(s, s + first, 0.0f);
      std::fill(s + lim + 1, s + masked_zeros_end(lim, kend, Tk), 0.0f);
    }
    // forward: S = scale * Q @ K^T  =>  dQ += scale * dS @ K
    gemm(Transpose::no, Transpose::no, rows, hd, nkeys, scale, S + kbeg, Tk, K + kbeg * ldkv, ldkv, true, dQ, ldq);
  }

  // Phase 2, per key block of one (b, kv head): dk and dv sum over every query head of the
  // group and every query that sees the block; one task owns those rows of dk and dv, so the
  // sums need no atomics and always run in the same order.
  const int64_t nkb = ceil_div(Tk, kBlock);
  const int64_t nktasks = B * NKV * nkb;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < nktasks; ++task) {
    const int64_t b = task / (NKV * nkb), g = task / nkb % NKV, kb = task % nkb;
    const int64_t c0 = kb * kBlock, c1 = std::min(Tk, c0 + kBlock);
    const int64_t t0 = std::max<int64_t>(0, c0 - off);  // first query that sees key c0
    if (t0 >= Tq) continue;
    const int64_t cols = c1 - c0, nq = Tq - t0;
    float* dK = dk + (b * Tk + c0) * ldkv + g * hd;  // (cols, hd)
    float* dV = dv + (b * Tk + c0) * ldkv + g * hd;  // (cols, hd)
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const float* Q = q + (b * Tq + t0) * ldq + h * hd;              // (nq, hd)
      const float* dO = dout + (b * Tq + t0) * ldq + h * hd;          // (nq, hd)
      if (bf.q) {
        // The same two products on phase 1's rounded dS and P, (nq, cols) blocks, ld ldr.
        const uint16_t* Sr = rounded + ((b * NH + h) * Tq + t0) * ldr + c0;
        gemm_bf16(Transpose::yes, Transpose::no, cols, hd, nq, scale, Sr, ldr, bf.q + (Q - q), ldq, true, dK,
                  ldkv);
        gemm_bf16(Transpose::yes, Transpose::no, cols, hd, nq, 1.0f, Sr + Tk, ldr, bf.dout + (dO - dout), ldq,
                  true, dV, ldkv);
        continue;
      }
      const float* S = scratch + ((b * NH + h) * Tq + t0) * Tk + c0;  // (nq, cols), ld Tk
      const float* P = probs + ((b * NH + h) * Tq + t0) * Tk + c0;    // (nq, cols), ld Tk
      // forward: S = scale * Q @ K^T  =>  dK += scale * dS^T @ Q
      gemm(Transpose::yes, Transpose::no, cols, hd, nq, scale, S, Tk, Q, ldq, true, dK, ldkv);
      // forward: O = P @ V  =>  dV += P^T @ dO
      gemm(Transpose::yes, Transpose::no, cols, hd, nq, 1.0f, P, Tk, dO, ldq, true, dV, ldkv);
    }
  }
}

}  // namespace flotilla::kernels
