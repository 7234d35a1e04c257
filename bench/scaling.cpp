// Data-parallel scaling of flotilla on W1 full fine-tuning: the same AdamW steps as
// bench/train_throughput, with the gradients combined across ranks by DataParallel (the
// code path `flotilla train` runs under mpirun) before every optimizer step.
//
//   mpirun -np N scaling --workload W1 --threads 1 --steps S --warmup W [--bucket-mb MB] [--json]
//
// As `flotilla train` does by default, gradients go out in fusion buckets of --bucket-mb
// (25) while backward runs, and the step waits only for the buckets still in flight;
// --bucket-mb 0 exchanges the whole gradient after backward instead.
//
// Weak scaling, as DistributedDataParallel is usually measured: every rank trains on its
// own micro-batch of the workload's shape (B x T), so the global batch grows with the
// world and tokens/s = world x B x T x steps / time. The time is rank 0's, between two
// barriers around the timed steps, so it covers the slowest rank. Rank 0 prints one JSON
// line: tokens/s, ms per step and its parts (compute, gradient all-reduce, optimizer),
// the gradient bytes each rank sends into the all-reduce, and peak memory (rank 0).
// bench/scaling (the driver) runs this beside the PyTorch DDP peer and prints the table.
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/base/threads.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/comm/mpi/mpi_runtime.hpp"
#include "flotilla/comm/world.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/parallel/data_parallel.hpp"
#include "flotilla/train/adamw.hpp"
#include "timed_step.hpp"
#include "workloads.hpp"

namespace {

using flotilla::Timer;

struct Args {
  std::string workload = "W1";
  int threads = 1, steps = 5, warmup = 1;
  double bucket_mb = 25.0;  // `flotilla train --bucket-mb`'s default
  bool json = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto need = [&](int j) -> std::string {
      if (j + 1 >= argc) throw std::invalid_argument(s + " needs a value");
      return argv[j + 1];
    };
    if (s == "--workload") a.workload = need(i++);
    else if (s == "--threads") a.threads = std::stoi(need(i++));
    else if (s == "--steps") a.steps = std::stoi(need(i++));
    else if (s == "--warmup") a.warmup = std::stoi(need(i++));
    else if (s == "--bucket-mb") a.bucket_mb = std::stod(need(i++));
    else if (s == "--json") a.json = true;
    else throw std::invalid_argument("unknown argument " + s);
  }
  if (a.threads < 1 || a.steps < 1 || a.warmup < 0 || a.bucket_mb < 0)
    throw std::invalid_argument("need --threads >= 1, --steps >= 1, --warmup >= 0, --bucket-mb >= 0");
  return a;
}

// Hands each gradient range backward finishes to the overlapped all-reduce.
struct OverlapHook final : flotilla::model::ParallelContext {
  flotilla::parallel::DataParallel* dp = nullptr;
  void grad_ready(flotilla::model::GradSpan r) override { dp->overlap()->ready({r.begin, r.end}); }
};

struct StepMs {
  double compute = 0, all_reduce = 0, optimizer = 0;
};

int run(const Args& args) {
  const flotilla::bench::Workload* w = flotilla::bench::find_workload(args.workload);
  if (w == nullptr) throw std::invalid_argument("unknown workload " + args.workload + " (W1, W2)");
  flotilla::set_num_threads(args.threads);
  const std::unique_ptr<flotilla::comm::Communicator> world = flotilla::comm::make_world();
  std::unique_ptr<flotilla::parallel::DataParallel> dp;
  if (world->size() > 1) dp = std::make_unique<flotilla::parallel::DataParallel>(*world);
  const int rank = world->rank(), ranks = world->size();

  const flotilla::model::ModelConfig cfg = flotilla::bench::make_config(*w);
  const int64_t B = w->batch, T = w->seq, V = w->vocab;
  OverlapHook overlap_hook;  // outlives the model, which points at it
  overlap_hook.dp = dp.get();
  flotilla::model::Llama model(cfg);
  model.init_random(0);
  if (dp) dp->broadcast_parameters(model.params());
  const bool overlap = dp && args.bucket_mb > 0.0;
  if (overlap) {
    std::vector<flotilla::comm::GradRange> order;
    for (const auto& r : model.grad_ready_order()) order.push_back({r.begin, r.end});
    dp->enable_overlap(order, static_cast<int64_t>(args.bucket_mb * 1024 * 1024), nullptr);
    model.set_parallel_context(&overlap_hook);
  }
  flotilla::train::AdamW opt(model.layout(), {.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.1f});
  constexpr float kLr = 1e-4f;

  // Each rank draws its own random batch, as the peers do.
  flotilla::Rng rng(1000 + static_cast<uint64_t>(rank));
  flotilla::bench::RandomBatch batch(B, T, V);
  StepMs ms;
  auto train_step = [&](StepMs* acc) {
    batch.draw(rng);
    Timer t;
    model.zero_grads();
    flotilla::model::LossSum loss = model.forward(batch.tokens.data(), batch.targets.data(), B, T);
    std::span<float> grads = model.grads();
    if (overlap) dp->overlap()->begin(grads);
    model.backward(1.0f);  // gradient sums; divided by the global token count below
    const double t_compute = t.elapsed_ms();
    // With overlap, what is left of the exchange after backward: the last buckets.
    if (overlap) loss = dp->finish_overlapped_gradients(loss);
    else if (dp) loss = dp->all_reduce_gradients(grads, loss);
    const double t_reduce = t.elapsed_ms();
    flotilla::kernels::scale_inplace(grads.data(), static_cast<int64_t>(grads.size()),
                                     1.0f / static_cast<float>(loss.num_tokens));
    opt.step(model.params(), grads, kLr);
    if (acc != nullptr) {
      acc->compute += t_compute;
      acc->all_reduce += t_reduce - t_compute;
      acc->optimizer += t.elapsed_ms() - t_reduce;
    }
  };
  for (int i = 0; i < args.warmup; ++i) train_step(nullptr);
  world->barrier({.name = "timed steps start"});
  Timer timed;
  for (int i = 0; i < args.steps; ++i) train_step(&ms);
  world->barrier({.name = "timed steps end"});
  const double elapsed_s = timed.elapsed_s();
  if (rank != 0) return 0;

  const double steps = args.steps;
  const nlohmann::json out = {
      {"impl", "flotilla"},
      {"workload", args.workload},
      {"ranks", ranks},
      {"threads", args.threads},
      {"params", model.params().size()},
      {"batch_per_rank", B},
      {"seq", T},
      {"steps", args.steps},
      {"tokens_per_s", static_cast<double>(ranks * B * T) * steps / elapsed_s},
      {"step_ms", 1000.0 * elapsed_s / steps},
      {"compute_ms", ms.compute / steps},
      {"all_reduce_ms", ms.all_reduce / steps},
      {"bucket_mb", overlap ? args.bucket_mb : 0.0},
      {"optimizer_ms", ms.optimizer / steps},
      {"all_reduce_bytes", ranks > 1 ? model.params().size() * sizeof(float) : 0},
      {"peak_rss_bytes", flotilla::peak_rss_bytes()},
  };
  if (args.json) {
    std::cout << out.dump() << std::endl;
  } else {
    std::printf("flotilla %s on %d rank(s) x %d thread(s): %.0f tokens/s, %.0f ms/step (compute %.0f, all-reduce %.0f, "
                "optimizer %.0f)\n",
                args.workload.c_str(), ranks, args.threads, out["tokens_per_s"].get<double>(),
                out["step_ms"].get<double>(), out["compute_ms"].get<double>(), out["all_reduce_ms"].get<double>(),
                out["optimizer_ms"].get<double>());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const auto mpi = flotilla::comm::MpiRuntime::start_if_launched(&argc, &argv);
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[bench/scaling] %s\n", e.what());
    if (mpi) flotilla::comm::MpiRuntime::abort(1);
    return 1;
  }
}
