// LoRA fine-tuning throughput of flotilla (issue 4): full training steps of LoRA adapters
// over a frozen float32 base (zero_grads, forward, backward of the mean loss, AdamW over the
// adapters only), on random tokens, timed after warm-up. Prints one JSON line;
// bench/lora_throughput runs this and the PyTorch peer (bench/torch_lora_throughput.py)
// one after the other and prints the table with the ratios.
//
//   lora_throughput [--workload W1|W2] [--threads N] [--steps S] [--warmup W]
//                   [--rank R] [--alpha A] [--targets q,k,v,o] [--bits 0|4|8]
//                   [--dtype float32|bf16] [--json] [--breakdown]
//
// --breakdown: on stderr, the phases and the per-op replay of the step (bench/op_profile.hpp,
// as bench/train_throughput prints it): each family of products next to the bare oneDNN
// calls on the same shapes, in the format the model runs them.
//
// --bits 4 (or 8): the frozen base is quantized (MLX layout, group size 64 where it divides
// the dimensions, else 32; f16 scales):
// it is written tensor by tensor into a temporary directory and loaded from there as
// `flotilla train --model Q4DIR` loads it (packed weights mapped, never whole in float),
// so the peak memory is that of a real run; the directory is removed at the end.
//
// The workloads are bench/train_throughput's (W2, the issue's: dim 768, 12 layers, 12 heads,
// FFN 2048, vocab 32000, seq 512, batch 4), with random base weights: the values do not
// change the work done. The adapters start as PEFT starts them (A uniform, B zero), on every
// layer. Peak memory is VmHWM read right after the timed steps.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "op_profile.hpp"
#include "timed_step.hpp"
#include "workloads.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/base/rng.hpp"
#include "flotilla/base/threads.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/model/config.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/matmul_dtype.hpp"
#include "flotilla/model/lora.hpp"
#include "flotilla/model/model_writer.hpp"
#include "flotilla/train/adamw.hpp"

namespace {

using flotilla::Rng;
using flotilla::Timer;
using flotilla::model::ModelConfig;

using flotilla::bench::find_workload;
using flotilla::bench::make_config;
using flotilla::bench::Workload;

using flotilla::bench::PhaseMs;
using flotilla::bench::RandomBatch;

struct Args {
  std::string workload = "W2";
  int threads = 2, steps = 3, warmup = 1;
  int64_t rank = 8;
  float alpha = 16.0f;
  std::string targets = "q,k,v,o";
  int bits = 0;  // 0: float32 base
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
    else if (s == "--rank") a.rank = std::stoll(need(i));
    else if (s == "--alpha") a.alpha = std::stof(need(i));
    else if (s == "--targets") a.targets = need(i);
    else if (s == "--bits") a.bits = std::stoi(need(i));
    else if (s == "--dtype") a.dtype = need(i);
    else if (s == "--json") a.json = true;
    else if (s == "--breakdown") a.breakdown = true;
    else if (s == "-h" || s == "--help") {
      std::cout << "usage: lora_throughput [--workload W1|W2] [--threads N] [--steps S] [--warmup W] "
                   "[--rank R] [--alpha A] [--targets q,k,v,o] [--bits 0|4|8] [--json]\n";
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown flag " + std::string(s));
    }
  }
  if (a.threads < 1 || a.steps < 1 || a.warmup < 0 || a.rank < 1)
    throw std::invalid_argument("need --threads >= 1, --steps >= 1, --warmup >= 0, --rank >= 1");
  return a;
}

int run(const Args& args) {
  const Workload* w = find_workload(args.workload);
  if (w == nullptr) throw std::invalid_argument("unknown workload " + args.workload + " (W1, W2)");
  flotilla::set_num_threads(args.threads);

  const ModelConfig cfg = make_config(*w);
  const int64_t B = w->batch, T = w->seq, V = w->vocab;
  // A quantized base goes through a directory, as in a real run (see the header).
  struct RemoveDir {
    std::filesystem::path path;
    ~RemoveDir() {
      std::error_code ec;
      if (!path.empty()) std::filesystem::remove_all(path, ec);
    }
  } qdir;
  flotilla::model::Llama model = [&] {
    if (args.bits == 0) {
      flotilla::model::Llama m(cfg);
      m.init_random(0);
      return m;
    }
    qdir.path = std::filesystem::temp_directory_path() / ("flotilla_lora_bench_q" + std::to_string(getpid()));
    std::filesystem::create_directories(qdir.path);
    flotilla::model::ModelWriteOptions options;
    options.dtype = flotilla::DType::f16;
    // Group size 64 as mlx_lm's default, 32 where 64 does not divide (W1's 288).
    const int64_t group = cfg.dim % 64 == 0 && cfg.ffn_dim % 64 == 0 ? 64 : 32;
    options.quantize = flotilla::QuantFormat{args.bits, group};
    flotilla::model::write_model(qdir.path, cfg, options, flotilla::model::random_init_source(cfg, 0));
    return flotilla::model::Llama::load(qdir.path);
  }();
  flotilla::model::LoraConfig lora_cfg;
  lora_cfg.rank = args.rank;
  lora_cfg.alpha = args.alpha;
  lora_cfg.dropout = 0.0f;
  lora_cfg.targets = flotilla::model::LoraConfig::parse_targets(args.targets);
  lora_cfg.num_layers = -1;  // every layer
  flotilla::model::LoraAdapters adapters(cfg, lora_cfg);
  adapters.init_random(1);
  model.attach_lora(&adapters);  // freezes the base: no base gradient buffer at all
  const auto dtype = flotilla::model::parse_matmul_dtype(args.dtype);
  if (!dtype) throw std::invalid_argument("--dtype: float32 or bf16, not " + args.dtype);
  model.set_matmul_input(flotilla::model::resolve_matmul_dtype(*dtype));
  int64_t adapter_params = 0;
  for (const auto& info : adapters.table().params()) adapter_params += info.numel;

  // torch.optim.AdamW's defaults, as the peer uses them: betas (0.9, 0.999), eps 1e-8,
  // weight decay 0.01.
  const flotilla::model::Llama::Trainable trainable = model.trainable();
  flotilla::train::AdamW opt(trainable.table, {.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                                               .weight_decay = 0.01f});
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
  const int64_t peak_rss = flotilla::peak_rss_bytes();

  const double steps = args.steps;
  const double tokens_per_s = static_cast<double>(B * T) * steps / elapsed_s;
  const nlohmann::json out = {
      {"impl", "flotilla"},
      {"dtype", flotilla::model::matmul_dtype_name(model.matmul_input())},
      {"workload", args.workload},
      {"threads", args.threads},
      {"params", cfg.num_params()},
      {"adapter_params", adapter_params},
      {"rank", args.rank},
      {"alpha", args.alpha},
      {"targets", args.targets},
      {"bits", args.bits},
      {"batch", B},
      {"seq", T},
      {"steps", args.steps},
      {"warmup", args.warmup},
      {"tokens_per_s", tokens_per_s},
      {"step_ms", 1000.0 * elapsed_s / steps},
      {"last_loss", last_loss},
      {"peak_rss_bytes", peak_rss},
      {"activation_bytes", model.activation_bytes(B, T)},
      {"base_grads_allocated", model.base_grads_allocated()},
      {"phase_ms",
       {{"zero_grads", phases.zero_grads / steps},
        {"forward", phases.forward / steps},
        {"backward", phases.backward / steps},
        {"optimizer", phases.optimizer / steps}}},
  };
  if (args.breakdown) {
    // The same step replayed op by op (bench/op_profile.hpp): the frozen base's products
    // (input gradients only) and the adapters' in the formats the model runs them.
    flotilla::bench::ProfiledStep profiled;
    profiled.input = model.matmul_input();
    profiled.lora_rank = args.rank;
    profiled.lora_input = model.adapter_input();
    for (const auto t : lora_cfg.targets) {
      const flotilla::model::LoraSlot& slot = adapters.slot(0, t);
      if (slot.active()) profiled.lora.emplace_back(slot.in, slot.out);
    }
    std::fprintf(stderr, "\n[%s LoRA] phases, ms per step (mean of %d timed steps): forward %.1f, backward %.1f, "
                 "optimizer %.1f\n", args.workload.c_str(), args.steps, phases.forward / steps,
                 phases.backward / steps, phases.optimizer / steps);
    flotilla::bench::print_op_profile(
        flotilla::bench::op_profile(cfg, B, T, 3, profiled),
        "[" + args.workload + " LoRA] per-op replay, ms per step (model's shapes and call counts; base frozen: "
        "its backward makes input gradients only)",
        0, (phases.forward + phases.backward) / steps);
  }
  if (args.json) {
    std::cout << out.dump() << std::endl;
  } else {
    std::printf("flotilla LoRA %s: %d threads, %.1fM base params (frozen, %s), %.2fM adapter params "
                "(rank %lld, alpha %g, %s), B=%lld T=%lld: %.0f tokens/s, %.1f ms/step "
                "(forward %.1f, backward %.1f, optimizer %.1f), peak RSS %.0f MiB\n",
                args.workload.c_str(), args.threads, cfg.num_params() / 1e6,
                args.bits ? (std::to_string(args.bits) + "-bit").c_str() : "float32", adapter_params / 1e6,
                static_cast<long long>(args.rank), args.alpha, args.targets.c_str(),
                static_cast<long long>(B), static_cast<long long>(T), tokens_per_s, 1000.0 * elapsed_s / steps,
                phases.forward / steps, phases.backward / steps, phases.optimizer / steps,
                peak_rss / 1048576.0);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[bench/lora_throughput] %s\n", e.what());
    return 1;
  }
}
