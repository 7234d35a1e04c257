// Training throughput of flotilla on the two workloads: full AdamW steps on random
// tokens (zero_grads, forward, backward of the mean loss, optimizer), timed after warm-up.
// Prints one JSON line; bench/train_throughput runs this and the PyTorch peer one after the
// other and prints the table with the ratios.
//
//   train_throughput --workload W1|W2 --threads N --steps S --warmup W [--dtype float32|bf16] [--json]
//                    [--breakdown]
//
// Without --json a short human summary goes to stdout as well; --breakdown adds, on stderr,
// ms per step for each phase (zero_grads, forward, backward, optimizer) and a per-op
// profile: every kernel the model calls, replayed with the model's shapes and call counts
// on scratch buffers (the model's own code is not instrumented), next to the SGEMM rate.
//
// Also measured in the same process: the machine's SGEMM rate (plan::measure_sgemm, the thread
// count given, best over a few repeats of shapes the workload uses and of 2048^3), so that
// achieved model FLOP/s can be stated as a fraction of what the GEMM engine (oneDNN, through
// kernels::matmul_forward) does on this machine.
// Peak memory is VmHWM read right after the timed steps, before anything else allocates.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/buffer.hpp"
#include "timed_step.hpp"
#include "workloads.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/base/threads.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/matmul_dtype.hpp"
#include "flotilla/plan/flops.hpp"
#include "flotilla/train/adamw.hpp"

namespace {

using flotilla::Rng;
using flotilla::best_of_ms;
using flotilla::Timer;
using flotilla::model::ModelConfig;
namespace k = flotilla::kernels;

using flotilla::bench::find_workload;
using flotilla::bench::make_config;
using flotilla::bench::Workload;

// Model FLOPs per token and the SGEMM rate live in the library (plan/flops.hpp): the
// planner's --no-run estimate divides the one by the other.
using flotilla::plan::flops_per_token;
using flotilla::plan::measure_sgemm;
using flotilla::plan::SgemmRate;
using flotilla::plan::SgemmShape;

using flotilla::bench::PhaseMs;
using flotilla::bench::RandomBatch;

// One row of the per-op profile: ms per training step spent in one kernel family.
struct OpRow {
  std::string name;
  double ms_per_step;
  double gflop_per_step;  // matmul FLOPs done by that row (0 for elementwise work)
};

// Replays every kernel call of one training step with the model's shapes and counts, each
// family timed separately (best of `repeats`), so the phase times above can be split by op.
// Buffers are scratch of one layer's size, reused across layers: the numbers are for warm
// caches where the model's are not quite, so the sum may come out a little under the phases.
std::vector<OpRow> op_profile(const ModelConfig& c, int64_t B, int64_t T, int repeats) {
  const int64_t N = B * T, C = c.dim, F = c.ffn_dim, V = c.vocab_size, L = c.n_layers;
  const int64_t NH = c.n_heads, NKV = c.n_kv_heads, hd = c.head_dim, Dq = c.q_dim(),
                Dkv = c.kv_dim();
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

  const double layer_linear_flop = 2.0 * N * (C * Dq + 2.0 * C * Dkv + Dq * C + 3.0 * C * F);
  const double lm_flop = 2.0 * N * C * V;
  const double attn_flop_causal = 2.0 * B * NH * hd * static_cast<double>(T) * (T + 1);  // QK^T + PV
  std::vector<OpRow> rows;
  auto add = [&](std::string name, double per_call_ms, double calls, double gflop) {
    rows.push_back({std::move(name), per_call_ms * calls, gflop});
  };
  add("fwd linear (7 per layer)", best_of_ms(repeats, [&] {
        k::matmul_forward(out_q.data(), x.data(), wq.data(), nullptr, N, C, Dq);
        k::matmul_forward(out_kv.data(), x.data(), wk.data(), nullptr, N, C, Dkv);
        k::matmul_forward(out_kv.data(), x.data(), wv.data(), nullptr, N, C, Dkv);
        k::matmul_forward(out_c.data(), att.data(), wo.data(), nullptr, N, Dq, C);
        k::matmul_forward(out_f.data(), x.data(), wg.data(), nullptr, N, C, F);
        k::matmul_forward(out_f.data(), x.data(), wu.data(), nullptr, N, C, F);
        k::matmul_forward(out_c.data(), xf.data(), wd.data(), nullptr, N, F, C);
      }), L, L * layer_linear_flop / 1e9);
  add("fwd lm_head", best_of_ms(repeats, [&] {
        k::matmul_forward(logits.data(), x.data(), wlm.data(), nullptr, N, C, V);
      }), 1, lm_flop / 1e9);
  add("fwd attention", best_of_ms(repeats, [&] {
        k::attention_forward(att.data(), probs.data(), q.data(), kk.data(), vv.data(), B, T, T, NH,
                             NKV, hd);
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

  add("bwd lm_head (dx, dW)", best_of_ms(repeats, [&] {
        k::matmul_backward(dx_c.data(), dwlm.data(), nullptr, logits.data(), x.data(), wlm.data(),
                           N, C, V);
      }), 1, 2 * lm_flop / 1e9);
  add("bwd linear (dx, dW; 7 per layer)", best_of_ms(repeats, [&] {
        k::matmul_backward(dx_f.data(), dwf.data(), nullptr, out_c.data(), xf.data(), wd.data(), N, F, C);
        k::matmul_backward(dx_c.data(), dwf.data(), nullptr, out_f.data(), x.data(), wg.data(), N, C, F);
        k::matmul_backward(dx_c.data(), dwf.data(), nullptr, out_f2.data(), x.data(), wu.data(), N, C, F);
        k::matmul_backward(dx_q.data(), dwc.data(), nullptr, out_c.data(), att.data(), wo.data(), N, Dq, C);
        k::matmul_backward(dx_c.data(), dwq.data(), nullptr, q.data(), x.data(), wq.data(), N, C, Dq);
        k::matmul_backward(dx_c.data(), dwkv.data(), nullptr, kk.data(), x.data(), wk.data(), N, C, Dkv);
        k::matmul_backward(dx_c.data(), dwkv.data(), nullptr, vv.data(), x.data(), wv.data(), N, C, Dkv);
      }), L, 2 * L * layer_linear_flop / 1e9);
  add("bwd attention", best_of_ms(repeats, [&] {
        k::attention_backward(dq.data(), dk.data(), dv.data(), dprobs.data(), att.data(), q.data(),
                              kk.data(), vv.data(), probs.data(), B, T, T, NH, NKV, hd);
      }), L, 2 * L * attn_flop_causal / 1e9);
  // Backward recomputes the two RMSNorms and the SwiGLU product (see model/llama.hpp).
  add("bwd elementwise (norm rope swiglu, recompute)", best_of_ms(repeats, [&] {
        k::swiglu_forward(out_f.data(), g.data(), u.data(), N, F);
        k::swiglu_backward(out_f.data(), out_f2.data(), xf.data(), g.data(), u.data(), N, F);
        k::rmsnorm_forward(out_c.data(), rstd.data(), x.data(), norm_w.data(), N, C, c.rms_norm_eps);
        k::rmsnorm_backward(dx_c.data(), dnorm_w.data(), out_c.data(), x.data(), norm_w.data(),
                            rstd.data(), N, C);
        k::rope_backward(dq.data(), cos.data(), sin.data(), B, T, NH, hd);
        k::rope_backward(dk.data(), cos.data(), sin.data(), B, T, NKV, hd);
        k::rmsnorm_forward(out_c.data(), rstd.data(), x.data(), norm_w.data(), N, C, c.rms_norm_eps);
        k::rmsnorm_backward(dx_c.data(), dnorm_w.data(), out_c.data(), x.data(), norm_w.data(),
                            rstd.data(), N, C);
      }), L, 0);
  add("bwd cross-entropy + embedding", best_of_ms(repeats, [&] {
        k::cross_entropy_backward_inplace(logits.data(), tokens.data(), N, V, -100, 1.0f / N);
        k::embedding_backward(dwte.data(), out_c.data(), tokens.data(), N, C);
      }), 1, 0);
  return rows;
}

struct Args {
  std::string workload = "W1";
  int threads = 2, steps = 5, warmup = 1;
  std::string dtype = "float32";  // matrix products: float32 or bf16 (as train --dtype)
  bool json = false, breakdown = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::invalid_argument(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string_view s = argv[i];
    if (s == "--workload") a.workload = need(i);
    else if (s == "--threads") a.threads = std::stoi(need(i));
    else if (s == "--steps") a.steps = std::stoi(need(i));
    else if (s == "--warmup") a.warmup = std::stoi(need(i));
    else if (s == "--dtype") a.dtype = need(i);
    else if (s == "--json") a.json = true;
    else if (s == "--breakdown") a.breakdown = true;
    else if (s == "-h" || s == "--help") {
      std::cout << "usage: train_throughput --workload W1|W2 --threads N --steps S --warmup W "
                   "[--dtype float32|bf16] [--json] [--breakdown]\n";
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown flag " + std::string(s));
    }
  }
  if (a.threads < 1 || a.steps < 1 || a.warmup < 0)
    throw std::invalid_argument("need --threads >= 1, --steps >= 1, --warmup >= 0");
  return a;
}

int run(const Args& args) {
  const Workload* w = find_workload(args.workload);
  if (w == nullptr) throw std::invalid_argument("unknown workload " + args.workload + " (W1, W2)");
  flotilla::set_num_threads(args.threads);

  const ModelConfig cfg = make_config(*w);
  const int64_t B = w->batch, T = w->seq, V = w->vocab;
  flotilla::model::Llama model(cfg);
  model.init_random(0);
  const auto dtype = flotilla::model::parse_matmul_dtype(args.dtype);
  if (!dtype) throw std::invalid_argument("--dtype: float32 or bf16, not " + args.dtype);
  model.set_matmul_input(flotilla::model::resolve_matmul_dtype(*dtype));
  // torch.optim.AdamW's defaults, as the peer uses them: betas (0.9, 0.999), eps 1e-8.
  flotilla::train::AdamW opt(model.layout(), {.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                                              .weight_decay = 0.1f});
  constexpr float kLr = 1e-4f;

  RandomBatch batch(B, T, V);
  Rng rng(0);
  PhaseMs phases;
  double last_loss = 0.0;
  auto train_step = [&](PhaseMs* acc) {
    batch.draw(rng);
    last_loss = flotilla::bench::timed_adamw_step(model, opt, batch, kLr, acc);
  };
  for (int i = 0; i < args.warmup; ++i) train_step(nullptr);
  Timer timed;
  for (int i = 0; i < args.steps; ++i) train_step(&phases);
  const double elapsed_s = timed.elapsed_s();
  const int64_t peak_rss = flotilla::peak_rss_bytes();  // before the SGEMM buffers below

  const double tokens_per_s = static_cast<double>(B * T) * args.steps / elapsed_s;
  const double fpt = flops_per_token(cfg, T);
  const SgemmRate sgemm = measure_sgemm({{B * T, cfg.dim, cfg.dim},
                                         {B * T, cfg.ffn_dim, cfg.dim},
                                         {B * T, cfg.dim, cfg.ffn_dim},
                                         {2048, 2048, 2048}},
                                        5);
  const double achieved_gflops = tokens_per_s * fpt / 1e9;
  const double steps = args.steps;

  nlohmann::json out = {
      {"impl", "flotilla"},
      {"dtype", flotilla::model::matmul_dtype_name(model.matmul_input())},
      {"workload", args.workload},
      {"threads", args.threads},
      {"params", cfg.num_params()},
      {"batch", B},
      {"seq", T},
      {"steps", args.steps},
      {"warmup", args.warmup},
      {"tokens_per_s", tokens_per_s},
      {"step_ms", 1000.0 * elapsed_s / steps},
      {"last_loss", last_loss},
      {"peak_rss_bytes", peak_rss},
      {"activation_bytes", model.activation_bytes(B, T)},
      {"flops_per_token", fpt},
      {"achieved_gflops", achieved_gflops},
      {"sgemm_gflops", sgemm.best_gflops},
      {"sgemm_fraction", achieved_gflops / sgemm.best_gflops},
      {"phase_ms",
       {{"zero_grads", phases.zero_grads / steps},
        {"forward", phases.forward / steps},
        {"backward", phases.backward / steps},
        {"optimizer", phases.optimizer / steps}}},
  };
  if (!args.json) {
    std::printf("flotilla %s: %d threads, %.1fM params, B=%lld T=%lld: %.0f tokens/s, %.1f ms/step, "
                "peak RSS %.0f MiB, %.1f MFLOP/token, %.1f GFLOP/s = %.0f%% of SGEMM %.1f GFLOP/s\n",
                args.workload.c_str(), args.threads, cfg.num_params() / 1e6,
                static_cast<long long>(B), static_cast<long long>(T), tokens_per_s,
                1000.0 * elapsed_s / steps, peak_rss / 1048576.0, fpt / 1e6, achieved_gflops,
                100.0 * achieved_gflops / sgemm.best_gflops, sgemm.best_gflops);
  }

  if (args.breakdown) {
    std::fprintf(stderr, "\n[%s] phases, ms per step (mean of %d timed steps)\n",
                 args.workload.c_str(), args.steps);
    const double total = (phases.zero_grads + phases.forward + phases.backward + phases.optimizer) / steps;
    const std::pair<const char*, double> ph[] = {{"zero_grads", phases.zero_grads / steps},
                                                 {"forward", phases.forward / steps},
                                                 {"backward", phases.backward / steps},
                                                 {"optimizer", phases.optimizer / steps}};
    for (const auto& [name, ms] : ph)
      std::fprintf(stderr, "  %-12s %9.1f ms  %5.1f%%\n", name, ms, 100.0 * ms / total);
    std::fprintf(stderr, "  %-12s %9.1f ms\n", "total", total);

    std::fprintf(stderr, "\n[%s] SGEMM rate, %d threads (C = A @ B^T, best of 5)\n",
                 args.workload.c_str(), args.threads);
    for (const auto& [s, gf] : sgemm.per_shape)
      std::fprintf(stderr, "  M=%-5lld N=%-5lld K=%-5lld %7.1f GFLOP/s\n",
                   static_cast<long long>(s.M), static_cast<long long>(s.N),
                   static_cast<long long>(s.K), gf);

    const std::vector<OpRow> rows = op_profile(cfg, B, T, 3);
    std::fprintf(stderr,
                 "\n[%s] per-op replay, ms per step (model's shapes and call counts; GEMM FLOPs "
                 "as executed, causal attention counted once)\n",
                 args.workload.c_str());
    double sum = 0;
    for (const OpRow& r : rows) sum += r.ms_per_step;
    for (const OpRow& r : rows) {
      std::fprintf(stderr, "  %-46s %9.1f ms  %5.1f%%", r.name.c_str(), r.ms_per_step,
                   100.0 * r.ms_per_step / sum);
      if (r.gflop_per_step > 0)
        std::fprintf(stderr, "  %7.1f GFLOP/s (%3.0f%% of SGEMM)",
                     r.gflop_per_step / (r.ms_per_step / 1e3),
                     100.0 * r.gflop_per_step / (r.ms_per_step / 1e3) / sgemm.best_gflops);
      std::fprintf(stderr, "\n");
    }
    std::fprintf(stderr, "  %-46s %9.1f ms  (forward+backward measured: %.1f ms)\n", "sum", sum,
                 (phases.forward + phases.backward) / steps);
  }
  if (args.json) std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[bench/train_throughput] %s\n", e.what());
    return 1;
  }
}
