#include "flotilla/plan/measure.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "flotilla/base/error.hpp"
#include "flotilla/base/memory.hpp"
#include "flotilla/base/threads.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/comm/algorithms/all_reduce.hpp"
#include "flotilla/comm/wire_bytes.hpp"
#include "flotilla/data/batch_sampler.hpp"
#include "flotilla/data/text_dataset.hpp"
#include "flotilla/data/token_dataset.hpp"
#include "flotilla/model/llama.hpp"
#include "flotilla/model/matmul_dtype.hpp"
#include "flotilla/plan/flops.hpp"
#include "flotilla/text/byte_tokenizer.hpp"
#include "flotilla/text/tokenizer.hpp"
#include "flotilla/train/adamw.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::plan {
namespace {

namespace fs = std::filesystem;

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

bool is_model_dir(const fs::path& model) { return fs::is_directory(model); }

std::unique_ptr<text::Tokenizer> make_tokenizer(const PlanSource& src) {
  if (is_model_dir(src.model)) return text::Tokenizer::load_for_model(src.model);
  return std::make_unique<text::ByteTokenizer>();
}

// The data as train reads it: a prepared folder (one epoch = its training examples) or a
// raw token stream (one epoch = its training tokens in windows of seq_len).
struct OpenedData {
  std::unique_ptr<data::TokenDataset> prepared;
  std::unique_ptr<data::TokenDataset::SplitExamples> examples;
  std::vector<int32_t> stream;
  DataSize size;
};

OpenedData open_data(const PlanSource& src, const text::Tokenizer& tokenizer) {
  if (!fs::exists(src.data)) throw InputError("plan", src.data.string() + ": no such data file or folder (--data)");
  OpenedData d;
  const double T = static_cast<double>(src.seq_len);
  if (fs::is_directory(src.data)) {
    d.prepared = std::make_unique<data::TokenDataset>(data::TokenDataset::open(src.data, tokenizer));
    if (!d.prepared->has_split(data::Split::train))
      throw InputError("plan", src.data.string() + ": the prepared dataset has no training examples");
    d.examples = std::make_unique<data::TokenDataset::SplitExamples>(d.prepared->examples(data::Split::train));
    d.size.prepared = true;
    d.size.train_tokens = d.prepared->num_tokens(data::Split::train);
    d.size.train_examples = d.prepared->num_examples(data::Split::train);
    // Packed rows hold about seq_len tokens each; padded rows hold one example.
    d.size.rows_per_epoch = src.pack ? std::ceil(static_cast<double>(d.size.train_tokens) / T)
                                     : static_cast<double>(d.size.train_examples);
    d.size.description = fmt::format("{} prepared: {} training examples, {} tokens, {}", src.data.string(),
                                      d.size.train_examples, d.size.train_tokens, src.pack ? "packed" : "padded");
  } else {
    const data::TextDataset text = data::load_text_dataset(src.data, tokenizer);
    data::StreamSplit split = data::split_train_valid(text.tokens, src.valid_fraction);
    if (static_cast<int64_t>(split.train.size()) <= src.seq_len)
      throw InputError("plan", fmt::format("{}: {} training tokens, fewer than one sequence of {} + 1",
                                           src.data.string(), split.train.size(), src.seq_len));
    d.size.train_tokens = split.train.size();
    d.size.rows_per_epoch = static_cast<double>(split.train.size()) / T;
    d.size.description = fmt::format("{}: {} documents, {} training tokens", src.data.string(), text.num_documents,
                                      split.train.size());
    d.stream = std::move(split.train);
  }
  if (d.size.rows_per_epoch < 1) d.size.rows_per_epoch = 1;
  return d;
}

}  // namespace

model::ModelConfig load_plan_model_config(const fs::path& model) {
  if (is_model_dir(model)) return model::ModelConfig::load(model / "config.json");
  if (!fs::is_regular_file(model))
    throw InputError("plan", model.string() + ": no such model directory or config.json (--model)");
  return model::ModelConfig::load(model);
}

DataSize measure_data(const PlanSource& src) {
  const std::unique_ptr<text::Tokenizer> tokenizer = make_tokenizer(src);
  return open_data(src, *tokenizer).size;
}

StepCost measure_step(const PlanSource& src, const MeasureOptions& opt, DataSize* data) {
  const std::unique_ptr<text::Tokenizer> tokenizer = make_tokenizer(src);
  OpenedData d = open_data(src, *tokenizer);
  if (data) *data = d.size;
  std::optional<model::Llama> model;
  if (is_model_dir(src.model)) {
    model.emplace(model::Llama::load(src.model));
  } else {
    model.emplace(load_plan_model_config(src.model));
    model->init_random(src.seed);
  }
  if (tokenizer->vocab_size() > model->config().vocab_size)
    throw InputError("plan", fmt::format("tokenizer '{}' has {} tokens but the model's vocabulary is {}",
                                         tokenizer->name(), tokenizer->vocab_size(), model->config().vocab_size));
  std::optional<model::LoraAdapters> adapters;
  if (src.lora) {
    adapters.emplace(model->config(), src.lora_config);
    adapters->init_random(src.seed);
    model->attach_lora(&*adapters);
  }
  model->set_grad_checkpoint(src.grad_checkpoint);
  model->set_matmul_input(src.dtype);
  std::unique_ptr<data::BatchSource> source;
  if (d.prepared) {
    data::SamplerConfig sc;
    sc.seq_len = src.seq_len;
    sc.micro_batch = src.batch_size;
    sc.grad_accum = src.grad_accum;
    sc.pack = src.pack;
    sc.seed = src.seed;
    sc.pad_id = std::max(0, tokenizer->pad_id());
    source = std::make_unique<data::BatchSampler>(*d.examples, sc);
  } else {
    source = std::make_unique<data::RandomWindowSource>(std::move(d.stream), src.seed);
  }
  train::TrainConfig tc;
  tc.batch_size = src.batch_size;
  tc.seq_len = src.seq_len;
  tc.grad_accum = src.grad_accum;
  tc.steps = opt.warmup_steps + opt.steps;
  train::Trainer trainer(*model, tc);
  std::vector<double> data_s, compute_s, update_s;
  StepCost c;
  for (int i = 0; i < opt.warmup_steps + opt.steps; ++i) {
    const train::StepMetrics m = trainer.step(*source);
    if (i < opt.warmup_steps) continue;
    data_s.push_back(m.data_s);
    compute_s.push_back(m.compute_s);
    update_s.push_back(m.update_s);
    c.work_samples_s.push_back(m.data_s + m.compute_s);
  }
  c.data_s = median(data_s);
  c.compute_s = median(compute_s);
  c.update_s = median(update_s);
  c.threads = num_threads();
  c.peak_rss_bytes = peak_rss_bytes();
  c.source = fmt::format("measured: median of {} training steps after {} warm-up, {} thread{}, {} products",
                         opt.steps, opt.warmup_steps, c.threads, c.threads == 1 ? "" : "s",
                         model::matmul_dtype_name(src.dtype));
  return c;
}

StepCost estimate_step(const Workload& w) {
  const model::ModelConfig& cfg = w.model;
  const SgemmRate rate = measure_sgemm(training_gemm_shapes(cfg, w.batch_size, w.seq_len), 3, w.dtype);
  const double fpt = (w.lora ? lora_flops_per_token(cfg, w.seq_len, w.trainable_floats) : flops_per_token(cfg, w.seq_len)) +
                     (w.grad_checkpoint ? recompute_flops_per_token(cfg, w.seq_len) : 0.0);
  StepCost c;
  c.compute_s = fpt * static_cast<double>(w.tokens_per_step()) / (rate.best_gflops * 1e9);
  // AdamW streams parameters, gradients and both moments: linear in the trainable size.
  constexpr int64_t kProbe = int64_t{1} << 20;
  struct Probe : model::ParamTable {
    explicit Probe(int64_t n) { add("probe", {n}, true); }
  } table(kProbe);
  train::AdamW adamw(table, {});
  std::vector<float> params(kProbe, 0.01f), grads(kProbe, 0.001f);
  adamw.step(params, grads, 1e-4f);
  std::vector<double> times;
  for (int i = 0; i < 5; ++i) {
    Timer t;
    adamw.step(params, grads, 1e-4f);
    times.push_back(t.elapsed_s());
  }
  c.update_s = median(times) * static_cast<double>(w.trainable_floats) / kProbe;
  c.threads = num_threads();
  c.source = fmt::format("estimated (--no-run): {:.3g} GFLOP per step at the {} rate {:.1f} GFLOP/s, {} thread{}",
                         fpt * static_cast<double>(w.tokens_per_step()) / 1e9,
                         w.dtype == kernels::GemmInput::bf16 ? "bf16 product" : "SGEMM", rate.best_gflops, c.threads,
                         c.threads == 1 ? "" : "s");
  return c;
}

Link measure_link(comm::Communicator& comm, double payload_bytes) {
  const int n = comm.size();
  Link link;
  if (n <= 1) return link;
  const comm::Options opts{.name = "plan link"};
  // The all-reduce `flotilla train` runs by default (--allreduce auto): the MPI library's
  // own can be far slower on the same link (OpenMPI's default TCP settings halve a 2-rank
  // exchange across hosts: bench/CLUSTER.md), and that is not the link training sees.
  comm::AllReducer reducer(comm);
  auto timed = [&](std::span<float> buf, int reps) {
    reducer.run(buf, comm::ReduceOp::sum, opts);  // warm-up: connections, registration
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
      Timer timer;
      reducer.run(buf, comm::ReduceOp::sum, opts);
      t.push_back(timer.elapsed_s());
    }
    std::array<double, 1> worst = {median(t)};
    comm.all_reduce(worst, comm::ReduceOp::max, opts);
    return worst[0];
  };
  std::vector<float> small(4, 1.0f);
  const size_t floats = static_cast<size_t>(std::max(payload_bytes, 1024.0 * 1024) / 4);
  std::vector<float> large(floats, 1.0f);
  const double t_small = timed(small, 50);
  const double t_large = timed(large, floats > (size_t{16} << 20) ? 3 : 10);
  link.latency_s = t_small / comm::all_reduce_ring_steps(n);
  const double wire = comm::all_reduce_wire_fraction(n) * static_cast<double>(floats) * 4;
  const double transfer_s = t_large - t_small > 0.05 * t_large ? t_large - t_small : t_large;
  link.bandwidth_bytes_per_s = wire / transfer_s;
  link.source = fmt::format("measured: median all-reduce over {} ranks on {} (16 B: {}, {}: {})", n,
                            comm.local_size() == n ? "one host" : "several hosts", format_seconds(t_small),
                            format_bytes(static_cast<double>(floats) * 4), format_seconds(t_large));
  return link;
}

}  // namespace flotilla::plan
