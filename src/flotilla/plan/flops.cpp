#include "flotilla/plan/flops.hpp"

#include <algorithm>
#include <functional>

#include "flotilla/base/rng.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/kernels/kernels.hpp"

namespace flotilla::plan {
namespace {

// Parameters of one block's matmuls that a token goes through: wq, wk, wv, wo, wgate, wup,
// wdown; in a mixture of experts the router, the k experts it picks and a shared expert
// (averaged over the layers, which may differ: Qwen2-MoE's dense and sparse layers).
double layer_matmul_params(const model::ModelConfig& c) {
  const double C = static_cast<double>(c.dim);
  double mlp = 0.0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    mlp += 3.0 * C * static_cast<double>(c.dense_mlp_dim(l));
    if (c.moe_layer(l))
      mlp += C * static_cast<double>(c.moe.num_experts) +
             3.0 * C * static_cast<double>(c.moe.top_k) * static_cast<double>(c.moe.expert_ffn_dim) +
             (c.moe.shared_expert_ffn_dim > 0 ? C : 0.0);
  }
  return C * c.q_dim() + 2.0 * C * c.kv_dim() + c.q_dim() * C + mlp / static_cast<double>(std::max<int64_t>(c.n_layers, 1));
}

// Parameters of the matmuls: every linear layer plus lm_head.
double matmul_params(const model::ModelConfig& c) {
  return layer_matmul_params(c) * c.n_layers + static_cast<double>(c.dim) * c.vocab_size;
}

double attention_flops(const model::ModelConfig& c, int64_t T) {
  return 12.0 * c.n_layers * c.n_heads * c.head_dim * static_cast<double>(T);
}

}  // namespace

double flops_per_token(const model::ModelConfig& c, int64_t T) {
  return 6.0 * matmul_params(c) + attention_flops(c, T);
}

double recompute_flops_per_token(const model::ModelConfig& c, int64_t T) {
  const double blocks = static_cast<double>(std::max<int64_t>(c.n_layers - 1, 0));
  return blocks * (2.0 * layer_matmul_params(c) + 4.0 * c.n_heads * c.head_dim * static_cast<double>(T));
}

double lora_flops_per_token(const model::ModelConfig& c, int64_t T, int64_t lora_params) {
  return 4.0 * matmul_params(c) + attention_flops(c, T) + 6.0 * static_cast<double>(lora_params);
}

SgemmRate measure_sgemm(const std::vector<SgemmShape>& shapes, int repeats, kernels::GemmInput input) {
  SgemmRate rate;
  Rng rng(1);
  for (const SgemmShape& s : shapes) {
    std::vector<float> a(static_cast<size_t>(s.M * s.K)), b(static_cast<size_t>(s.N * s.K)),
        out(static_cast<size_t>(s.M * s.N));
    rng.fill_uniform(a, -1.0f, 1.0f);
    rng.fill_uniform(b, -1.0f, 1.0f);
    std::vector<uint16_t> b16;
    if (input == kernels::GemmInput::bf16) {
      b16.resize(b.size());
      kernels::convert_to_bf16(b.data(), static_cast<int64_t>(b.size()), b16.data());
    }
    const double ms = best_of_ms(repeats, [&] {
      if (input == kernels::GemmInput::bf16)
        kernels::matmul_forward_bf16(out.data(), a.data(), b16.data(), nullptr, s.M, s.K, s.N);
      else
        kernels::matmul_forward(out.data(), a.data(), b.data(), nullptr, s.M, s.K, s.N);
    });
    const double gflops = 2.0 * static_cast<double>(s.M) * s.N * s.K / (ms * 1e6);
    rate.per_shape.emplace_back(s, gflops);
    rate.best_gflops = std::max(rate.best_gflops, gflops);
  }
  return rate;
}

std::vector<SgemmShape> training_gemm_shapes(const model::ModelConfig& c, int64_t B, int64_t T) {
  const int64_t N = B * T;
  return {{N, c.q_dim(), c.dim}, {N, c.ffn_dim, c.dim}, {N, c.dim, c.ffn_dim}, {N, std::min<int64_t>(c.vocab_size, 8192), c.dim}};
}

}  // namespace flotilla::plan
