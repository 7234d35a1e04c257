// Kernels: pure float32 math on buffers, forward and backward, in the style of llm.c:
// every layer is a *_forward / *_backward pair with the same argument order; backward
// ADDS (+=) into parameter gradients and into input gradients unless said otherwise;
// shapes are in the comments, row-major, N = B*T rows. No model knowledge here.
// Multithreaded with OpenMP; matrix products go through gemm() (gemm.hpp: oneDNN, whose
// threads are the same OpenMP pool).
#pragma once

#include <cstdint>
#include <string>

#include "flotilla/kernels/gemm.hpp"

namespace flotilla::kernels {

// ---------------------------------------------------------------------------- matmul
// out = inp @ weight^T + bias        (PyTorch nn.Linear layout: weight is (OC, C))
// out (N, OC), inp (N, C), weight (OC, C), bias (OC) or nullptr.
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t N, int64_t C, int64_t OC);
// dinp += dout @ weight;  dweight += dout^T @ inp;  dbias += sum_rows(dout).
// Any of dinp, dweight, dbias may be nullptr (frozen weight, or first layer's input).
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int64_t N, int64_t C, int64_t OC);

// out += alpha * inp @ weight^T      out (N, OC), inp (N, C), weight (OC, C). For low-rank
// adapters, whose product is added onto the frozen layer's output.
void matmul_accumulate(float* out, const float* inp, const float* weight, int64_t N, int64_t C,
                       int64_t OC, float alpha);

// bf16 products (mixed precision): the same products with their inputs rounded to bf16 and
// float32 accumulation and output (gemm_bf16; needs gemm_bf16_supported()). The float inputs
// (inp, dout) are rounded here into per-thread scratch; `weight` is the caller's bf16 copy
// (OC, C) of the float weight, made once per optimizer step rather than per product.
void matmul_forward_bf16(float* out, const float* inp, const uint16_t* weight, const float* bias, int64_t N,
                         int64_t C, int64_t OC);
void matmul_backward_bf16(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const uint16_t* weight, int64_t N, int64_t C, int64_t OC);
// The float-weight products in the format `input`: f32 as above; bf16 rounds the weight per
// call as well (for small weights that change every step: LoRA's adapters).
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int64_t C,
                    int64_t OC, GemmInput input);
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC, GemmInput input);
void matmul_accumulate(float* out, const float* inp, const float* weight, int64_t N, int64_t C, int64_t OC,
                       float alpha, GemmInput input);

// ------------------------------------------------------------------------- embedding
// out[n, :] = wte[tokens[n], :]     out (N, C), tokens (N), wte (V, C).
// Tokens are assumed in [0, V) (the model checks them once per batch).
void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C);
// dwte[tokens[n], :] += dout[n, :]. Deterministic: independent of thread count.
void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t N,
                        int64_t C);
// The same for a slice of the embedding, rows [row_begin, row_end) of the vocabulary
// (tensor parallelism): wte and dwte (row_end - row_begin, C); tokens outside the slice
// give zero rows of out and add nothing to dwte.
void embedding_forward_rows(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C,
                            int64_t row_begin, int64_t row_end);
void embedding_backward_rows(float* dwte, const float* dout, const int32_t* tokens, int64_t N, int64_t C,
                             int64_t row_begin, int64_t row_end);

// --------------------------------------------------------------------------- rmsnorm
// out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps)
// out (N, C), rstd (N) saved for backward, inp (N, C), weight (C).
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, float eps);
// dinp += ..., dweight += ...;  dweight may be nullptr (frozen).
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int64_t N, int64_t C);

// ------------------------------------------------------------------------------ rope
// Rotary embeddings in Hugging Face's Llama layout (rotate_half): within a head of size
// hd, element i pairs with element i + hd/2 and both turn by angle pos * inv_freq[i].
struct RopeScaling {
  // Llama 3 "rope_type": "llama3" scaling; factor <= 0 means none.
  float factor = 0.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int64_t original_max_position = 8192;
};
// inv_freq (hd/2): theta^(-2i/hd), then Llama 3 scaling when scaling.factor > 0.
void rope_inv_freq(float* inv_freq, int64_t hd, float theta, const RopeScaling& scaling);
// cos, sin (T, hd/2) for positions pos0 .. pos0+T-1. The angle is the float32 product
// float(pos) * inv_freq[i], exactly as Hugging Face forms it; its cos/sin are evaluated in
// double and rounded once (HF takes float32 cos/sin of the same float32 angle).
void rope_table(float* cos, float* sin, const float* inv_freq, int64_t pos0, int64_t T, int64_t hd);
// In place on x (B, T, NH, hd): x = x * cos + rotate_half(x) * sin. Token (b, t) uses row
// positions[b*T + t] of cos/sin, or row t when positions is nullptr (packed sequences
// restart their positions at each example's start).
void rope_forward(float* x, const float* cos, const float* sin, int64_t B, int64_t T, int64_t NH,
                  int64_t hd, const int32_t* positions = nullptr);
// In place on dx (B, T, NH, hd): the transpose of the rotation (turn by -angle). Overwrites.
void rope_backward(float* dx, const float* cos, const float* sin, int64_t B, int64_t T,
                   int64_t NH, int64_t hd, const int32_t* positions = nullptr);

// ------------------------------------------------------------------------- attention
// Causal scaled dot-product attention with grouped-query attention (NH query heads share
// NKV key/value heads; head h uses kv head h / (NH / NKV)).
// q (B, Tq, NH, hd); k, v (B, Tk, NKV, hd) with Tk >= Tq: query t sits at position
// t + (Tk - Tq) and attends keys 0 .. t + (Tk - Tq) (this covers the KV-cache decode).
// out (B, Tq, NH, hd); probs (B, NH, Tq, Tk) softmax weights saved for backward (entries
// before the visible range and just after it are written as 0; the masked upper triangle
// past the query's 64-key block is never written nor read). scale = 1/sqrt(hd).
// key_start (B, Tq) or nullptr: query t of row b sees only keys key_start[b*Tq + t] ..
// t + (Tk - Tq) — the start of its own example when several are packed into one row, so
// packed examples never attend across their boundaries. nullptr means 0 for every query.
// input: the products' number format (QK^T, PV and backward's four); bf16 rounds their
// inputs (q, k, v, dout, and the P and dS blocks) and accumulates in float32, while the
// softmax, its backward, probs and the outputs stay float32. Decoding steps (Tq <
// kGemmPrimitiveMinRows with Tk > Tq) and CPUs without bf16 products run float32.
void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v,
                       int64_t B, int64_t Tq, int64_t Tk, int64_t NH, int64_t NKV, int64_t hd,
                       const int32_t* key_start = nullptr, GemmInput input = GemmInput::f32);
// dq, dk, dv += ...  (same shapes as q, k, v). scratch: B*NH*Tq*Tk floats, any contents.
void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                        const float* q, const float* k, const float* v, const float* probs,
                        int64_t B, int64_t Tq, int64_t Tk, int64_t NH, int64_t NKV, int64_t hd,
                        const int32_t* key_start = nullptr, GemmInput input = GemmInput::f32);

// ---------------------------------------------------------------------------- swiglu
// out = silu(gate) * up, silu(x) = x * sigmoid(x).   out, gate, up (N, F).
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int64_t F);
// dgate, dup: OVERWRITTEN (not accumulated) with the gradients. (N, F).
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N, int64_t F);

// --------------------------------------------------------------------- cross entropy
// Softmax cross-entropy over logits (N, V) with targets (N); target == ignore_index
// contributes nothing. losses (N): -log softmax(logits)[target], 0 for ignored rows.
// Returns the number of non-ignored rows. Targets outside [0, V) other than ignore_index
// are the caller's bug (the model checks them).
int64_t cross_entropy_forward(float* losses, const float* logits, const int32_t* targets,
                              int64_t N, int64_t V, int32_t ignore_index);
// In place: logits (N, V) become dlogits = dloss_scale * (softmax(logits) - onehot(target)),
// rows with ignore_index become 0. This is the gradient of dloss_scale * sum(losses).
void cross_entropy_backward_inplace(float* logits, const int32_t* targets, int64_t N, int64_t V,
                                    int32_t ignore_index, float dloss_scale);
// Vocabulary-parallel cross-entropy's pieces (Megatron-LM): logits (N, V) are one slice of
// the vocabulary, columns [vocab_begin, vocab_begin + V) of the whole (N, Vfull); targets
// (N) are ids of the whole vocabulary. The caller combines the slices between the steps:
//   1. row_max (N) = each row's max over the slice         -> max over the slices;
//   2. sum_exp (N) = sum over the slice of exp(logit - row_max), target_logit (N) =
//      logit[target] - row_max where the slice holds the target, else 0 (both 0 on
//      ignored rows)                                        -> sums over the slices;
//      then loss = log(sum_exp) - target_logit;
//   3. in place: logits become dloss_scale * (exp(logit - row_max) / sum_exp - onehot),
//      the one-hot only in the slice that holds the target; ignored rows 0.
void cross_entropy_slice_max(float* row_max, const float* logits, int64_t N, int64_t V);
void cross_entropy_slice_sums(float* sum_exp, float* target_logit, const float* logits, const float* row_max,
                              const int32_t* targets, int64_t N, int64_t V, int64_t vocab_begin,
                              int32_t ignore_index);
void cross_entropy_slice_backward_inplace(float* logits, const float* row_max, const float* sum_exp,
                                          const int32_t* targets, int64_t N, int64_t V, int64_t vocab_begin,
                                          int32_t ignore_index, float dloss_scale);

// ------------------------------------------------------------------------------ adamw
// Decoupled weight decay (Loshchilov & Hutter), bias-corrected; step counts from 1.
// param -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * param)
// m, v are updated in place. All of length n. Computed as torch.optim.AdamW does: decay
// first, then the Adam step; the float hyperparameters are read as the shortest decimal that
// round-trips them (0.999f -> 0.999, as the Python float torch would get).
struct AdamWParams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;
};
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWParams& hp);

// --------------------------------------------------------------------------- dropout
// Inverted dropout: out = inp * keep / (1 - p), keep[i] ~ Bernoulli(1 - p) drawn from a
// counter-based hash of (seed, i), so backward regenerates the same mask without storing it
// and the result does not depend on the thread count. p in [0, 1). out may alias inp.
void dropout_forward(float* out, const float* inp, int64_t n, float p, uint64_t seed);
// dinp += dout * keep / (1 - p), the same mask.
void dropout_backward(float* dinp, const float* dout, int64_t n, float p, uint64_t seed);
// The same masks on a block of columns: inp and out (rows, cols) are columns [first, first +
// cols) of a (rows, full_cols) tensor, and element (i, j) keeps as element i full_cols +
// first + j of the whole tensor does under dropout_forward. A tensor-parallel rank holding
// an input's column slice (a row-parallel layer's) drops what one rank would.
void dropout_forward_columns(float* out, const float* inp, int64_t rows, int64_t cols, int64_t full_cols,
                             int64_t first, float p, uint64_t seed);
void dropout_backward_columns(float* dinp, const float* dout, int64_t rows, int64_t cols, int64_t full_cols,
                              int64_t first, float p, uint64_t seed);

// ------------------------------------------------------------------------- utilities
// sum of squares in double precision (for global-norm gradient clipping).
double sum_squares(const float* x, int64_t n);
// x *= s
void scale_inplace(float* x, int64_t n, float s);
// x[0 .. n) = 0, multithreaded for large n (a gradient arena).
void zero_fill(float* x, int64_t n);
// y += x
void add_inplace(float* y, const float* x, int64_t n);

// ----------------------------------------------------------------- CPU and dispatch
// The vector features of this CPU that matter to flotilla, space-separated, from
// "avx2 fma avx512f avx512_bf16 amx" (x86-64; empty elsewhere).
std::string cpu_features();
// Which variant of the hot kernels this process runs (chosen once at load time from the
// CPU, see kernels/dispatch.hpp): "avx512" or "avx2" in the default build; "native" in a
// -DFLOTILLA_NATIVE=ON build whose baseline already has AVX-512 (nothing to choose), or
// "generic" on other architectures.
std::string kernel_isa();

}  // namespace flotilla::kernels
