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
// profile (bench/op_profile.hpp): every kernel the model calls, replayed with the model's
// shapes, call counts and matrix-product format on scratch buffers (the model's own code is
// not instrumented), each product family next to the bare oneDNN calls on the same shapes
// and to the SGEMM rate.
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
#include "op_profile.hpp"
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
using flotilla::Timer;
using flotilla::model::ModelConfig;

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

    flotilla::bench::ProfiledStep profiled;
    profiled.input = model.matmul_input();
    const std::vector<flotilla::bench::OpRow> rows = flotilla::bench::op_profile(cfg, B, T, 3, profiled);
    flotilla::bench::print_op_profile(
        rows,
        "[" + args.workload + "] per-op replay, ms per step (model's shapes and call counts; GEMM FLOPs as "
        "executed, causal attention counted once)",
        sgemm.best_gflops, (phases.forward + phases.backward) / steps);
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
