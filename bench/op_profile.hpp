// The per-op replay that bench/train_throughput and bench/lora_throughput print with
// --breakdown: every kernel one training step calls, replayed with the model's shapes and
// call counts on scratch buffers (the model's own code is not instrumented), each family
// timed on its own (best of a few repeats), in the matrix-product format the model runs
// (float32 or bf16).
//
// Each row of matrix products also carries the *engine* time of the same products: the bare
// oneDNN calls (gemm, or gemm_bf16 on inputs already in bf16) with the same shapes,
// transposes and call counts, timed in the same process. The ratio engine / row is how
// close the linear layers run to the oneDNN rate (issue 14 item 4: 80% or more); what
// separates them is the kernels' own work around the product (bf16 rounding of the inputs,
// bias, accumulation).
//
// Buffers are one layer's, reused across layers: warm caches where the model's are not
// quite, so the sum may come out a little under the measured phases.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <utility>
#include <cstdint>
#include <string>
#include <vector>

#include "flotilla/base/buffer.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/kernels/gemm.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/config.hpp"

namespace flotilla::bench {

// One row of the per-op profile: ms per training step spent in one kernel family.
struct OpRow {
  std::string name;
  double ms_per_step;
  double gflop_per_step;    // matrix-product FLOPs done by that row (0 for elementwise work)
  double engine_ms_per_step = 0;  // the same products as bare oneDNN calls (0: not measured)
  bool in_step = true;            // false: a comparison row, not part of the step's sum
};

// What the replayed step trains: every weight (full training), or LoRA adapters of rank
// `lora_rank` on the projections listed in `lora` over a frozen base (no weight gradients:
// backward makes only the input gradients of the base's products).
struct ProfiledStep {
  kernels::GemmInput input = kernels::GemmInput::f32;
  int64_t lora_rank = 0;                                 // 0: full training
  std::vector<std::pair<int64_t, int64_t>> lora;         // (in, out) of each adapted projection of a layer
  kernels::GemmInput lora_input = kernels::GemmInput::f32;  // the format of the adapters' products
};

// The best of `repeats` timed calls of each of fa and fb, the two alternating (after one
// untimed call of each), so that a neighbour's load drifting over the measurement touches
// both alike: {best ms of fa, best ms of fb}.
inline std::pair<double, double> best_of_alternating_ms(int repeats, const std::function<void()>& fa,
                                                        const std::function<void()>& fb) {
  fa();
  fb();
  double best_a = 1e300, best_b = 1e300;
  for (int r = 0; r < repeats; ++r) {
    Timer ta;
    fa();
    best_a = std::min(best_a, ta.elapsed_ms());
    Timer tb;
    fb();
    best_b = std::min(best_b, tb.elapsed_ms());
  }
  return {best_a, best_b};
}

inline std::vector<OpRow> op_profile(const model::ModelConfig& c, int64_t B, int64_t T, int repeats,
                                     const ProfiledStep& step) {
  namespace k = kernels;
  using k::Transpose;
  const int64_t N = B * T, C = c.dim, F = c.ffn_dim, V = c.vocab_size, L = c.n_layers;
  const int64_t NH = c.n_heads, NKV = c.n_kv_heads, hd = c.head_dim, Dq = c.q_dim(), Dkv = c.kv_dim();
  const bool bf16 = step.input == k::GemmInput::bf16, frozen = step.lora_rank > 0;
  auto buf = [](int64_t n) { return std::vector<float>(static_cast<size_t>(n), 0.01f); };
  Rng rng(2);
  auto rnd = [&](int64_t n, float lo, float hi) {
    auto v = buf(n);
    rng.fill_uniform(v, lo, hi);
    return v;
  };
  // Inputs and weights of one layer, and the lm_head.
  auto x = rnd(N * C, -1, 1), xf = rnd(N * F, -1, 1), g = rnd(N * F, -2, 2), u = rnd(N * F, -2, 2);
  auto wq = rnd(Dq * C, -.05f, .05f), wk = rnd(Dkv * C, -.05f, .05f), wv = rnd(Dkv * C, -.05f, .05f);
  auto wo = rnd(C * Dq, -.05f, .05f), wg = rnd(F * C, -.05f, .05f), wu = rnd(F * C, -.05f, .05f);
  auto wd = rnd(C * F, -.05f, .05f), wlm = rnd(V * C, -.05f, .05f), wte = rnd(V * C, -.05f, .05f);
  auto q = rnd(N * Dq, -1, 1), kk = rnd(N * Dkv, -1, 1), vv = rnd(N * Dkv, -1, 1);
  auto att = buf(N * Dq), probs = buf(B * NH * T * T), dprobs = buf(B * NH * T * T);
  auto dq = buf(N * Dq), dk = buf(N * Dkv), dv = buf(N * Dkv);
  auto out_c = buf(N * C), out_q = buf(N * Dq), out_kv = buf(N * Dkv), out_f = buf(N * F);
  auto out_f2 = buf(N * F), dwq = buf(Dq * C), dwkv = buf(Dkv * C), dwf = buf(F * C), dwc = buf(C * Dq);
  auto dx_c = buf(N * C), dx_f = buf(N * F), dx_q = buf(N * Dq);  // input gradients
  auto rstd = buf(N), norm_w = rnd(C, 0.9f, 1.1f), dnorm_w = buf(C);
  auto logits = rnd(N * V, -3, 3), losses = buf(N), dwlm = buf(V * C), dwte = buf(V * C);
  std::vector<int32_t> tokens(static_cast<size_t>(N));
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(V)));
  std::vector<float> inv_freq(static_cast<size_t>(hd / 2)), cos(static_cast<size_t>(T * hd / 2)),
      sin(static_cast<size_t>(T * hd / 2));
  k::rope_inv_freq(inv_freq.data(), hd, c.rope_theta, c.rope_scaling);
  k::rope_table(cos.data(), sin.data(), inv_freq.data(), 0, T, hd);
  k::attention_forward(att.data(), probs.data(), q.data(), kk.data(), vv.data(), B, T, T, NH, NKV, hd);

  // bf16 copies: of each weight, as the model keeps them (made once per optimizer step, or
  // once for a frozen base), and of every product input, for the engine's rate.
  auto to_bf16 = [](const std::vector<float>& v) {
    Buffer<uint16_t> b(v.size());
    k::convert_to_bf16(v.data(), static_cast<int64_t>(v.size()), b.data());
    return b;
  };
  const Buffer<uint16_t> bwq = to_bf16(wq), bwk = to_bf16(wk), bwv = to_bf16(wv), bwo = to_bf16(wo),
                         bwg = to_bf16(wg), bwu = to_bf16(wu), bwd = to_bf16(wd), bwlm = to_bf16(wlm);
  const Buffer<uint16_t> bx = to_bf16(x), bxf = to_bf16(xf), batt = to_bf16(att), bout_c = to_bf16(out_c),
                         bout_f = to_bf16(out_f), bout_q = to_bf16(out_q), bout_kv = to_bf16(out_kv),
                         blogits = to_bf16(logits);

  // One linear layer's products in the step's format: forward, and backward's dx (and dW
  // unless the base is frozen). `engine` times the bare oneDNN calls instead.
  struct Linear {
    const float* x;             // (N, in)
    const uint16_t* x16;
    const float* w;             // (out, in)
    const uint16_t* w16;
    const float* dy;            // (N, out)
    const uint16_t* dy16;
    float* y;                   // (N, out)
    float* dx;                  // (N, in)
    float* dw;                  // (out, in)
    int64_t in, out;
  };
  auto forward = [&](const Linear& l, bool engine) {
    if (engine && bf16)
      k::gemm_bf16(Transpose::no, Transpose::yes, N, l.out, l.in, 1.0f, l.x16, l.in, l.w16, l.in, false, l.y, l.out);
    else if (engine)
      k::gemm(Transpose::no, Transpose::yes, N, l.out, l.in, 1.0f, l.x, l.in, l.w, l.in, false, l.y, l.out);
    else if (bf16)
      k::matmul_forward_bf16(l.y, l.x, l.w16, nullptr, N, l.in, l.out);
    else
      k::matmul_forward(l.y, l.x, l.w, nullptr, N, l.in, l.out);
  };
  auto backward = [&](const Linear& l, bool engine) {
    float* dw = frozen ? nullptr : l.dw;
    if (engine && bf16) {
      k::gemm_bf16(Transpose::no, Transpose::no, N, l.in, l.out, 1.0f, l.dy16, l.out, l.w16, l.in, true, l.dx, l.in);
      if (dw)
        k::gemm_bf16(Transpose::yes, Transpose::no, l.out, l.in, N, 1.0f, l.dy16, l.out, l.x16, l.in, true, dw, l.in);
    } else if (engine) {
      k::gemm(Transpose::no, Transpose::no, N, l.in, l.out, 1.0f, l.dy, l.out, l.w, l.in, true, l.dx, l.in);
      if (dw) k::gemm(Transpose::yes, Transpose::no, l.out, l.in, N, 1.0f, l.dy, l.out, l.x, l.in, true, dw, l.in);
    } else if (bf16) {
      k::matmul_backward_bf16(l.dx, dw, nullptr, l.dy, l.x, l.w16, N, l.in, l.out);
    } else {
      k::matmul_backward(l.dx, dw, nullptr, l.dy, l.x, l.w, N, l.in, l.out);
    }
  };
  const Linear layer[] = {
      {x.data(), bx.data(), wq.data(), bwq.data(), q.data(), bout_q.data(), out_q.data(), dx_c.data(), dwq.data(), C, Dq},
      {x.data(), bx.data(), wk.data(), bwk.data(), kk.data(), bout_kv.data(), out_kv.data(), dx_c.data(), dwkv.data(), C, Dkv},
      {x.data(), bx.data(), wv.data(), bwv.data(), vv.data(), bout_kv.data(), out_kv.data(), dx_c.data(), dwkv.data(), C, Dkv},
      {att.data(), batt.data(), wo.data(), bwo.data(), out_c.data(), bout_c.data(), out_c.data(), dx_q.data(), dwc.data(), Dq, C},
      {x.data(), bx.data(), wg.data(), bwg.data(), out_f.data(), bout_f.data(), out_f.data(), dx_c.data(), dwf.data(), C, F},
      {x.data(), bx.data(), wu.data(), bwu.data(), out_f2.data(), bout_f.data(), out_f2.data(), dx_c.data(), dwf.data(), C, F},
      {xf.data(), bxf.data(), wd.data(), bwd.data(), out_c.data(), bout_c.data(), out_c.data(), dx_f.data(), dwf.data(), F, C},
  };
  const Linear lm_head{x.data(), bx.data(), wlm.data(), bwlm.data(), logits.data(), blogits.data(), logits.data(),
                       dx_c.data(), dwlm.data(), C, V};

  const double layer_linear_flop = 2.0 * N * (C * Dq + 2.0 * C * Dkv + Dq * C + 3.0 * C * F);
  const double lm_flop = 2.0 * N * C * V;
  const double bwd_factor = frozen ? 1.0 : 2.0;  // dx, and dW unless frozen
  const double attn_flop_causal = 2.0 * B * NH * hd * static_cast<double>(T) * (T + 1);  // QK^T + PV
  const std::string fmt = bf16 ? "bf16" : "f32";
  std::vector<OpRow> rows;
  auto add = [&](std::string name, double per_call_ms, double calls, double gflop, double engine_per_call_ms = 0) {
    rows.push_back({std::move(name), per_call_ms * calls, gflop, engine_per_call_ms * calls});
  };
  // A family of products and the bare engine on the same products, timed alternately.
  auto add_products = [&](std::string name, double calls, double gflop, auto&& fn, const auto& linears) {
    const auto [ms, engine_ms] = best_of_alternating_ms(
        repeats + 2, [&] { for (const Linear& l : linears) fn(l, false); },
        [&] { for (const Linear& l : linears) fn(l, true); });
    add(std::move(name), ms, calls, gflop, engine_ms);
  };
  const Linear lm_heads[] = {lm_head};
  add_products("fwd linear (7 per layer, " + fmt + ")", L, L * layer_linear_flop / 1e9, forward, layer);
  add_products("fwd lm_head (" + fmt + ")", 1, lm_flop / 1e9, forward, lm_heads);
  add("fwd attention (" + fmt + ")", best_of_ms(repeats, [&] {
        k::attention_forward(att.data(), probs.data(), q.data(), kk.data(), vv.data(), B, T, T, NH, NKV, hd,
                             nullptr, step.input);
      }), L, L * attn_flop_causal / 1e9);
  add("fwd elementwise (norm rope swiglu)", best_of_ms(repeats, [&] {
        k::rmsnorm_forward(out_c.data(), rstd.data(), x.data(), norm_w.data(), N, C, c.rms_norm_eps);
        k::rmsnorm_forward(out_c.data(), rstd.data(), x.data(), norm_w.data(), N, C, c.rms_norm_eps);
        k::rope_forward(q.data(), cos.data(), sin.data(), B, T, NH, hd);
        k::rope_forward(kk.data(), cos.data(), sin.data(), B, T, NKV, hd);
        k::swiglu_forward(out_f.data(), g.data(), u.data(), N, F);
      }), L, 0);
  add("fwd cross-entropy + embedding", best_of_ms(repeats, [&] {
        k::embedding_forward(out_c.data(), tokens.data(), wte.data(), N, C);
        k::cross_entropy_forward(losses.data(), logits.data(), tokens.data(), N, V, -100);
      }), 1, 0);

  // LoRA's products, as model/lora.cpp and Llama::lora_backward make them: forward
  // u = scale * x A^T (N, r), y += u B^T; backward dB += dy^T u, du = scale * dy B,
  // dA += du^T x, dx += du A.
  const int64_t r = step.lora_rank;
  std::vector<float> la, lb, lu, lg, dla, dlb, lx, ly, ldx;
  auto lora_pass = [&](k::GemmInput in, bool backward_pass) {
    for (const auto& [n_in, n_out] : step.lora) {
      if (!backward_pass) {
        k::matmul_forward(lu.data(), lx.data(), la.data(), nullptr, N, n_in, r, in);
        k::scale_inplace(lu.data(), N * r, 2.0f);
        k::matmul_accumulate(ly.data(), lu.data(), lb.data(), N, r, n_out, 1.0f, in);
      } else {
        std::fill(lg.begin(), lg.end(), 0.0f);
        k::matmul_backward(lg.data(), dlb.data(), nullptr, ly.data(), lu.data(), lb.data(), N, r, n_out, in);
        k::scale_inplace(lg.data(), N * r, 2.0f);
        k::matmul_backward(ldx.data(), dla.data(), nullptr, lg.data(), lx.data(), la.data(), N, n_in, r, in);
      }
    }
  };
  if (frozen) {
    int64_t max_in = 0, max_out = 0;
    for (const auto& [n_in, n_out] : step.lora) max_in = std::max(max_in, n_in), max_out = std::max(max_out, n_out);
    la = rnd(r * max_in, -.05f, .05f), lb = rnd(max_out * r, -.05f, .05f);
    dla = buf(r * max_in), dlb = buf(max_out * r), lu = buf(N * r), lg = buf(N * r);
    lx = rnd(N * max_in, -1, 1), ly = rnd(N * max_out, -1, 1), ldx = buf(N * max_in);
    double lora_flop = 0;
    for (const auto& [n_in, n_out] : step.lora) lora_flop += 2.0 * N * r * (n_in + n_out);
    const std::string lfmt = step.lora_input == k::GemmInput::bf16 ? "bf16" : "f32";
    add("fwd LoRA (" + std::to_string(step.lora.size()) + " per layer, " + lfmt + ")",
        best_of_ms(repeats, [&] { lora_pass(step.lora_input, false); }), L, L * lora_flop / 1e9);
    add("bwd LoRA (" + std::to_string(step.lora.size()) + " per layer, " + lfmt + ")",
        best_of_ms(repeats, [&] { lora_pass(step.lora_input, true); }), L, 2 * L * lora_flop / 1e9);
  }

  add_products(std::string(frozen ? "bwd lm_head (dx, " : "bwd lm_head (dx, dW, ") + fmt + ")", 1,
               bwd_factor * lm_flop / 1e9, backward, lm_heads);
  add_products(std::string(frozen ? "bwd linear (dx; 7 per layer, " : "bwd linear (dx, dW; 7 per layer, ") + fmt + ")",
               L, bwd_factor * L * layer_linear_flop / 1e9, backward, layer);
  add("bwd attention (" + fmt + ")", best_of_ms(repeats, [&] {
        k::attention_backward(dq.data(), dk.data(), dv.data(), dprobs.data(), att.data(), q.data(),
                              kk.data(), vv.data(), probs.data(), B, T, T, NH, NKV, hd, nullptr, step.input);
      }), L, 2 * L * attn_flop_causal / 1e9);
  // Backward recomputes the two RMSNorms and the SwiGLU product (see model/llama.hpp).
  add("bwd elementwise (norm rope swiglu, recompute)", best_of_ms(repeats, [&] {
        k::swiglu_forward(out_f.data(), g.data(), u.data(), N, F);
        k::swiglu_backward(out_f.data(), out_f2.data(), xf.data(), g.data(), u.data(), N, F);
        k::rmsnorm_forward(out_c.data(), rstd.data(), x.data(), norm_w.data(), N, C, c.rms_norm_eps);
        k::rmsnorm_backward(dx_c.data(), frozen ? nullptr : dnorm_w.data(), out_c.data(), x.data(), norm_w.data(),
                            rstd.data(), N, C);
        k::rope_backward(dq.data(), cos.data(), sin.data(), B, T, NH, hd);
        k::rope_backward(dk.data(), cos.data(), sin.data(), B, T, NKV, hd);
        k::rmsnorm_forward(out_c.data(), rstd.data(), x.data(), norm_w.data(), N, C, c.rms_norm_eps);
        k::rmsnorm_backward(dx_c.data(), frozen ? nullptr : dnorm_w.data(), out_c.data(), x.data(), norm_w.data(),
                            rstd.data(), N, C);
      }), L, 0);
  add(frozen ? "bwd cross-entropy" : "bwd cross-entropy + embedding", best_of_ms(repeats, [&] {
        k::cross_entropy_backward_inplace(logits.data(), tokens.data(), N, V, -100, 1.0f / N);
        if (!frozen) k::embedding_backward(dwte.data(), out_c.data(), tokens.data(), N, C);
      }), 1, 0);
  if (frozen && k::gemm_bf16_supported()) {
    // For the record, the adapters' products in the other format too (not part of the
    // step), timed alternately with the step's format.
    const k::GemmInput other = step.lora_input == k::GemmInput::bf16 ? k::GemmInput::f32 : k::GemmInput::bf16;
    const auto [mine_ms, other_ms] = best_of_alternating_ms(
        repeats + 2,
        [&] {
          lora_pass(step.lora_input, false);
          lora_pass(step.lora_input, true);
        },
        [&] {
          lora_pass(other, false);
          lora_pass(other, true);
        });
    char name[96];
    std::snprintf(name, sizeof name, "(LoRA fwd+bwd in %s; alternating: %.0f ms in %s)",
                  other == k::GemmInput::bf16 ? "bf16" : "f32", mine_ms * static_cast<double>(L),
                  step.lora_input == k::GemmInput::bf16 ? "bf16" : "f32");
    add(name, other_ms, L, 0);
    rows.back().in_step = false;
  }
  return rows;
}

// Prints the rows on stderr: ms per step and share, GFLOP/s, and for matrix products the
// share of the bare oneDNN calls' rate (engine) and of `sgemm_gflops` (the float32 rate on
// the workload's shapes; 0: not printed). `measured_ms`: forward + backward of the real step.
inline void print_op_profile(const std::vector<OpRow>& rows, const std::string& title, double sgemm_gflops,
                             double measured_ms) {
  std::fprintf(stderr, "\n%s\n", title.c_str());
  double sum = 0;
  for (const OpRow& r : rows)
    if (r.in_step) sum += r.ms_per_step;
  for (const OpRow& r : rows) {
    std::fprintf(stderr, "  %-52s %9.1f ms  %5.1f%%", r.name.c_str(), r.ms_per_step, 100.0 * r.ms_per_step / sum);
    if (r.gflop_per_step > 0) {
      const double gflops = r.gflop_per_step / (r.ms_per_step / 1e3);
      std::fprintf(stderr, "  %7.1f GFLOP/s", gflops);
      if (r.engine_ms_per_step > 0)
        std::fprintf(stderr, " (%3.0f%% of oneDNN's %.1f on these products)", 100.0 * r.engine_ms_per_step / r.ms_per_step,
                     r.gflop_per_step / (r.engine_ms_per_step / 1e3));
      if (sgemm_gflops > 0) std::fprintf(stderr, " (%3.0f%% of SGEMM)", 100.0 * gflops / sgemm_gflops);
    }
    std::fprintf(stderr, "\n");
  }
  std::fprintf(stderr, "  %-52s %9.1f ms  (forward+backward measured: %.1f ms)\n", "sum", sum, measured_ms);
}

}  // namespace flotilla::bench
