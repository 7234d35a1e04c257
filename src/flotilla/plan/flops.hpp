// What a training step costs in arithmetic, and how fast this machine does it: the
// `flotilla plan --no-run` estimate of compute time (FLOPs / measured SGEMM rate), and the
// MFU figures of bench/train_throughput.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "flotilla/kernels/gemm.hpp"
#include "flotilla/model/config.hpp"

namespace flotilla::plan {

// Model FLOPs per trained token, the PaLM convention (Chowdhery et al. 2022, appendix B):
//   6 * N  +  12 * L * H * Q * T
// N = parameters that take part in a matmul: per layer wq, wk, wv, wo, wgate, wup, wdown,
// plus lm_head (the input embedding is a lookup, not a matmul; norms are not counted).
// 6 = 2 FLOPs per multiply-add, times 3 for forward + the two backward products.
// The attention term counts Q @ K^T and P @ V over the full T x T square (H heads of Q
// dims, L layers); causal masking makes half of it unnecessary, and flotilla's blocked
// attention does skip most of the masked half, so the real work is nearer 6 * L * H * Q * T.
// The convention is kept so the number compares with published MFU figures.
double flops_per_token(const model::ModelConfig& c, int64_t T);

// FLOPs per token of a LoRA step over a frozen base: the base's forward (2N) and its
// input-gradient products (2N, down to the first adapted layer; we count all layers),
// no weight-gradient products (the base is frozen), plus the attention term, plus the
// adapters' own 6 * trainable. An upper bound when only the last layers are adapted.
double lora_flops_per_token(const model::ModelConfig& c, int64_t T, int64_t lora_params);

// FLOPs per token that gradient checkpointing (train --grad-checkpoint) adds: backward
// recomputes the forward of every block but the last, 2 * (a block's matmul parameters)
// + 4 * H * Q * T each (the attention's forward third, same convention as above).
double recompute_flops_per_token(const model::ModelConfig& c, int64_t T);

struct SgemmShape {
  int64_t M, N, K;  // out (M, N) = A (M, K) @ B (N, K)^T, as kernels::matmul_forward calls it
};

struct SgemmRate {
  double best_gflops = 0.0;
  std::vector<std::pair<SgemmShape, double>> per_shape;  // GFLOP/s
};

// Times kernels::matmul_forward (the product every linear layer uses) on each shape with
// the current thread count: best of `repeats` after one untimed call. With `input` bf16,
// kernels::matmul_forward_bf16 on a bf16 copy of the weight made once, as the model's
// products run under --dtype bf16 (inputs rounded per call, float32 accumulation).
SgemmRate measure_sgemm(const std::vector<SgemmShape>& shapes, int repeats,
                        kernels::GemmInput input = kernels::GemmInput::f32);

// The shapes a training step of this model at (B, T) runs most: q/o, the MLP's two
// directions and the lm_head.
std::vector<SgemmShape> training_gemm_shapes(const model::ModelConfig& c, int64_t B, int64_t T);

}  // namespace flotilla::plan
