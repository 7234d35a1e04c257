#include "flotilla/parallel/pipeline.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstring>
#include <limits>

#include "flotilla/base/error.hpp"

namespace flotilla::parallel {
namespace {
constexpr std::string_view kPipelineComponent = "parallel/pipeline";

// Point-to-point tags: one per micro-batch and direction. Messages between two ranks on
// one tag arrive in order (MPI's non-overtaking rule), so tags may wrap.
int tag_of(int64_t micro, bool gradient) {
  return static_cast<int>((micro % 16000) * 2 + (gradient ? 1 : 0));
}
// Above tag_of's, below parallel/pipeline_sync.cpp's.
constexpr int kEvaluationTag = 32050;
}  // namespace

PipelineSchedule parse_pipeline_schedule(std::string_view name) {
  if (name == "gpipe") return PipelineSchedule::gpipe;
  if (name == "1f1b") return PipelineSchedule::one_f_one_b;
  throw InputError(kPipelineComponent, fmt::format("--pp-schedule '{}': expected gpipe or 1f1b", name));
}

std::string_view pipeline_schedule_name(PipelineSchedule schedule) {
  return schedule == PipelineSchedule::gpipe ? "gpipe" : "1f1b";
}

std::vector<int64_t> parse_pp_layers(std::string_view spec) {
  std::vector<int64_t> counts;
  std::string_view rest = spec;
  while (true) {
    const size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || end != item.data() + item.size() || v <= 0)
      throw InputError(kPipelineComponent, fmt::format("--pp-layers '{}': '{}' is not a positive whole number of layers "
                                               "(expected one count per stage, e.g. 3,3,2)",
                                               spec, item));
    counts.push_back(v);
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return counts;
}

double block_cost(const model::ModelConfig& cfg, int64_t seq_len) {
  double F = static_cast<double>(cfg.ffn_dim), router = 0.0;
  const double C = static_cast<double>(cfg.dim);
  if (cfg.is_moe()) {
    // A mixture's token runs its top K experts (and the shared one), after the router's C x
    // E product; every layer is counted as a mixture's (Qwen2-MoE's dense ones cost less).
    F = static_cast<double>(cfg.moe.top_k * cfg.moe.expert_ffn_dim + cfg.moe.shared_expert_ffn_dim);
    router = C * static_cast<double>(cfg.moe.num_experts);
  }
  const double Dq = static_cast<double>(cfg.q_dim()), Dkv = static_cast<double>(cfg.kv_dim());
  // q, k, v, o and the three MLP products; attention's scores and weighted sum, T keys
  // per query (both causal halves counted: the kernels compute the full rows).
  return C * Dq + 2.0 * C * Dkv + Dq * C + 3.0 * C * F + router + 2.0 * static_cast<double>(seq_len) * Dq;
}

double head_cost(const model::ModelConfig& cfg) {
  return static_cast<double>(cfg.dim) * static_cast<double>(cfg.vocab_size);
}

std::vector<StageRange> balance_stages(const model::ModelConfig& cfg, int stages, int64_t seq_len) {
  const int64_t L = cfg.n_layers;
  if (stages < 1 || stages > L)
    throw InputError(kPipelineComponent, fmt::format("pp={} stages for a model of {} layers: each stage needs at least one "
                                             "layer; use pp <= {}",
                                             stages, L, L));
  const double layer = block_cost(cfg, seq_len), head = head_cost(cfg);
  // cost of stage [a, b) given whether it is the last
  auto cost = [&](int64_t a, int64_t b) { return static_cast<double>(b - a) * layer + (b == L ? head : 0.0); };
  // best[s][l]: the least largest stage cost of cutting layers [0, l) into s stages.
  const double inf = std::numeric_limits<double>::infinity();
  const auto P = static_cast<size_t>(stages);
  std::vector<std::vector<double>> best(P + 1, std::vector<double>(static_cast<size_t>(L) + 1, inf));
  std::vector<std::vector<int64_t>> cut(P + 1, std::vector<int64_t>(static_cast<size_t>(L) + 1, 0));
  best[0][0] = 0.0;
  for (size_t s = 1; s <= P; ++s) {
    for (int64_t l = static_cast<int64_t>(s); l <= L; ++l) {
      for (int64_t a = static_cast<int64_t>(s) - 1; a < l; ++a) {
        const double c = std::max(best[s - 1][static_cast<size_t>(a)], cost(a, l));
        // Ties go to the later cut: earlier stages take more layers, the last (with the
        // head) fewer.
        if (c <= best[s][static_cast<size_t>(l)]) {
          best[s][static_cast<size_t>(l)] = c;
          cut[s][static_cast<size_t>(l)] = a;
        }
      }
    }
  }
  std::vector<StageRange> ranges(P);
  int64_t end = L;
  for (size_t s = P; s >= 1; --s) {
    const int64_t begin = cut[s][static_cast<size_t>(end)];
    ranges[s - 1] = {begin, end};
    end = begin;
  }
  return ranges;
}

std::vector<StageRange> stages_from_counts(const model::ModelConfig& cfg, int stages,
                                           std::span<const int64_t> layers_per_stage) {
  std::string given;
  int64_t sum = 0;
  for (const int64_t n : layers_per_stage) {
    if (!given.empty()) given += ',';
    given += std::to_string(n);
    sum += n;
  }
  if (static_cast<int>(layers_per_stage.size()) != stages)
    throw InputError(kPipelineComponent, fmt::format("--pp-layers {} gives {} stages, but the mesh has pp={}", given,
                                             layers_per_stage.size(), stages));
  if (sum != cfg.n_layers)
    throw InputError(kPipelineComponent, fmt::format("--pp-layers {} adds up to {} layers, but the model has {}", given, sum,
                                             cfg.n_layers));
  std::vector<StageRange> ranges;
  int64_t begin = 0;
  for (const int64_t n : layers_per_stage) {
    if (n <= 0) throw InputError(kPipelineComponent, fmt::format("--pp-layers {}: every stage needs at least one layer", given));
    ranges.push_back({begin, begin + n});
    begin += n;
  }
  return ranges;
}

std::vector<PipelineAction> gpipe_schedule(int /*stages*/, int /*stage*/, int64_t micro_batches) {
  std::vector<PipelineAction> actions;
  for (int64_t i = 0; i < micro_batches; ++i) actions.push_back({PipelineAction::Kind::forward, i});
  for (int64_t i = 0; i < micro_batches; ++i) actions.push_back({PipelineAction::Kind::backward, i});
  return actions;
}

std::vector<PipelineAction> one_f_one_b_schedule(int stages, int stage, int64_t micro_batches) {
  using K = PipelineAction::Kind;
  std::vector<PipelineAction> actions;
  // Warm-up: the stages below this one's last will need P-1-s more micro-batches before
  // the first gradient comes back.
  const int64_t warmup = std::min<int64_t>(stages - 1 - stage, micro_batches);
  for (int64_t i = 0; i < warmup; ++i) actions.push_back({K::forward, i});
  // Steady state: one forward, then the backward of the oldest micro-batch in flight.
  int64_t next_backward = 0;
  for (int64_t i = warmup; i < micro_batches; ++i) {
    actions.push_back({K::forward, i});
    actions.push_back({K::backward, next_backward++});
  }
  // Cool-down: the backwards of the micro-batches still in flight.
  while (next_backward < micro_batches) actions.push_back({K::backward, next_backward++});
  return actions;
}

std::vector<PipelineAction> stage_schedule(PipelineSchedule schedule, int stages, int stage, int64_t micro_batches) {
  return schedule == PipelineSchedule::gpipe ? gpipe_schedule(stages, stage, micro_batches)
                                             : one_f_one_b_schedule(stages, stage, micro_batches);
}

int64_t max_in_flight(std::span<const PipelineAction> actions) {
  int64_t live = 0, most = 0;
  for (const PipelineAction& a : actions) {
    live += a.kind == PipelineAction::Kind::forward ? 1 : -1;
    most = std::max(most, live);
  }
  return most;
}

PipelineStage::PipelineStage(comm::Communicator& pp, std::vector<StageRange> ranges, const PipelineConfig& config)
    : pp_(pp), ranges_(std::move(ranges)), config_(config) {
  if (static_cast<int>(ranges_.size()) != pp.size())
    throw Error(kPipelineComponent, fmt::format("{} stage ranges for a pp group of {}", ranges_.size(), pp.size()));
  if (config_.micro_batches < 1)
    throw InputError(kPipelineComponent, fmt::format("--micro-batches must be 1 or more, not {}", config_.micro_batches));
}

void PipelineStage::split(const data::Batch& batch, std::vector<data::Batch>& micro) const {
  const int64_t M = config_.micro_batches;
  if (batch.B % M != 0)
    throw InputError(kPipelineComponent, fmt::format("--micro-batches {} does not divide the batch of {} rows: each "
                                             "micro-batch must have the same number of rows",
                                             M, batch.B));
  const int64_t rows = batch.B / M, n = rows * batch.T;
  const size_t first = micro.size();
  micro.resize(first + static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) {
    data::Batch& m = micro[first + static_cast<size_t>(i)];
    m.B = rows;
    m.T = batch.T;
    auto slice = [&](const std::vector<int32_t>& from, std::vector<int32_t>& to) {
      if (from.empty()) {
        to.clear();
        return;
      }
      to.assign(from.begin() + i * n, from.begin() + (i + 1) * n);
    };
    slice(batch.tokens, m.tokens);
    slice(batch.targets, m.targets);
    slice(batch.doc_start, m.doc_start);
  }
}

size_t PipelineStage::acquire_slot() {
  if (!free_slots_.empty()) {
    const size_t s = free_slots_.back();
    free_slots_.pop_back();
    return s;
  }
  slots_.emplace_back();
  return slots_.size() - 1;
}

model::LossSum PipelineStage::run(model::Llama& model, std::span<const data::Batch> micro, TraceRecorder* trace) {
  const auto n = static_cast<int64_t>(micro.size());
  const int s = stage();
  // Whether a stage hands a gradient down: not when nothing below its first layer is
  // trained (LoRA adapters all at or above it). Then the stage below has nothing to train
  // either, and skips its backwards.
  auto hands_gradient_down = [&](int stage_index) {
    return !model.base_frozen() || model.lora()->first_layer() < ranges_[static_cast<size_t>(stage_index)].begin;
  };
  const bool send_grad = !first() && hands_gradient_down(s);
  const bool get_grad = last() || hands_gradient_down(s + 1);
  std::vector<size_t> slot_of(static_cast<size_t>(n), 0);
  // Outgoing activations and gradients, copied out of the slot (which the next backward
  // or a later micro-batch overwrites) and kept until their send completes.
  std::vector<Buffer<float>> outgoing;
  std::vector<comm::Request> sends;
  int64_t sent_bytes = 0;
  auto send = [&](std::span<const float> data, int dest, int tag) {
    sent_bytes += static_cast<int64_t>(data.size_bytes());
    outgoing.emplace_back(data.size());
    std::memcpy(outgoing.back().data(), data.data(), data.size_bytes());
    sends.push_back(pp_.isend(comm::ConstView(outgoing.back().span()), dest, tag));
  };
  // A mixture of experts: the load-balancing loss's statistics travel with the activations
  // and its totals with the gradients (model::Llama::add_upstream_router_statistics).
  const bool moe = model.config().is_moe();
  std::vector<double> router_in(moe ? model.router_statistics_size() : 0);
  std::vector<double> router_totals(moe ? model.router_statistics_size() + 1 : 0);
  std::vector<std::vector<double>> outgoing_doubles;
  outgoing_doubles.reserve(static_cast<size_t>(2 * n));  // sends read them until the flush ends
  auto send_doubles = [&](std::vector<double> data, int dest, int tag) {
    sent_bytes += static_cast<int64_t>(data.size() * sizeof(double));
    outgoing_doubles.push_back(std::move(data));
    sends.push_back(pp_.isend(comm::ConstView(std::span<const double>(outgoing_doubles.back())), dest, tag));
  };
  // The last stage's aux loss and dropped share per micro-batch, for the step's metrics.
  double aux_sum = 0.0, aux_tokens = 0.0, dropped_sum = 0.0, forwards = 0.0;
  auto count_router = [&](const model::Llama& m) {
    aux_sum += m.router_aux_loss() * static_cast<double>(m.router_aux_tokens());
    aux_tokens += static_cast<double>(m.router_aux_tokens());
    dropped_sum += m.expert_dropped_fraction();
    forwards += 1.0;
  };
  auto args = [&](int64_t i) { return trace ? fmt::format(R"({{"micro":{},"stage":{}}})", i, s) : std::string(); };
  model::LossSum total;
  const auto flush_start = std::chrono::steady_clock::now();
  for (const PipelineAction& a : stage_schedule(config_.schedule, stages(), s, n)) {
    const data::Batch& mb = micro[static_cast<size_t>(a.micro)];
    if (a.kind == PipelineAction::Kind::forward) {
      const size_t slot = acquire_slot();
      slot_of[static_cast<size_t>(a.micro)] = slot;
      model.swap_forward_slot(slots_[slot]);
      if (!first()) {
        std::span<float> in = model.stage_input(mb.B, mb.T);
        TraceSpan wait(trace, "wait for activations", TraceLane::compute, args(a.micro));
        pp_.recv(comm::MutView(in), s - 1, tag_of(a.micro, false), {.name = "pipeline activations"});
        if (moe) {  // the same tag: MPI keeps one sender's messages on one tag in order
          pp_.recv(comm::MutView(std::span<double>(router_in)), s - 1, tag_of(a.micro, false),
                   {.name = "pipeline router statistics"});
          model.add_upstream_router_statistics(router_in);
        }
      }
      {
        TraceSpan span(trace, "forward", TraceLane::compute, args(a.micro));
        const model::LossSum loss = model.forward(mb.tokens.data(), mb.targets.data(), mb.B, mb.T,
                                                  mb.doc_start.empty() ? nullptr : mb.doc_start.data());
        total.sum += loss.sum;
        total.num_tokens += loss.num_tokens;
      }
      if (!last()) send(model.stage_output(), s + 1, tag_of(a.micro, false));
      if (!last() && moe) send_doubles(model.router_statistics(), s + 1, tag_of(a.micro, false));
      if (last() && moe) count_router(model);
      model.swap_forward_slot(slots_[slot]);
    } else {
      const size_t slot = slot_of[static_cast<size_t>(a.micro)];
      if (get_grad) {
        model.swap_forward_slot(slots_[slot]);
        if (!last()) {
          TraceSpan wait(trace, "wait for gradient", TraceLane::compute, args(a.micro));
          pp_.recv(comm::MutView(model.stage_output_grad()), s + 1,
                   tag_of(a.micro, true), {.name = "pipeline gradients"});
          if (moe) {
            pp_.recv(comm::MutView(std::span<double>(router_totals)), s + 1, tag_of(a.micro, true),
                     {.name = "pipeline router totals"});
            model.set_router_totals(router_totals);
          }
        }
        {
          TraceSpan span(trace, "backward", TraceLane::compute, args(a.micro));
          model.backward(1.0f);  // sums of per-token gradients, as the trainer's exchange expects
        }
        if (send_grad) send(model.stage_input_grad(), s - 1, tag_of(a.micro, true));
        if (send_grad && moe) send_doubles(model.router_totals(), s - 1, tag_of(a.micro, true));
        model.swap_forward_slot(slots_[slot]);
      }
      free_slots_.push_back(slot);
    }
  }
  {
    TraceSpan wait(trace, "wait for sends", TraceLane::compute);
    comm::wait_all(sends);
  }
  bytes_sent_ += static_cast<uint64_t>(sent_bytes);
  if (moe) {
    // Every stage reports the step's router metrics as one rank's trainer does: the aux
    // loss weighted by each micro-batch's target tokens, the mean dropped share.
    double sums[4] = {aux_sum, aux_tokens, dropped_sum, forwards};
    pp_.all_reduce(comm::MutView(std::span<double>(sums)), comm::ReduceOp::sum, {.name = "pipeline router metrics"});
    router_aux_loss_ = sums[1] > 0.0 ? sums[0] / sums[1] : 0.0;
    expert_dropped_ = sums[3] > 0.0 ? sums[2] / sums[3] : 0.0;
  }
  // The flush as one span, with what bench/pipeline_bubble.py reads: the activation slots
  // this stage has held at most, and the bytes it sent to its neighbours.
  if (trace)
    trace->add("pipeline flush", TraceLane::compute, flush_start, std::chrono::steady_clock::now(),
               fmt::format(R"({{"stage":{},"stages":{},"micro_batches":{},"schedule":"{}","slots":{},"p2p_bytes":{}}})",
                           s, stages(), n, pipeline_schedule_name(config_.schedule), peak_slots(), sent_bytes));
  return total;
}

model::LossSum PipelineStage::forward_only(model::Llama& model, const data::Batch& batch) {
  const int s = stage();
  std::vector<data::Batch> micro;
  if (batch.B % config_.micro_batches == 0)
    split(batch, micro);
  else
    micro.push_back(batch);
  model::LossSum total;
  const size_t slot = acquire_slot();
  model.swap_forward_slot(slots_[slot]);
  for (const data::Batch& mb : micro) {
    if (!first())
      pp_.recv(comm::MutView(model.stage_input(mb.B, mb.T)), s - 1, kEvaluationTag,
               {.name = "pipeline activations (evaluation)"});
    const model::LossSum loss = model.forward(mb.tokens.data(), mb.targets.data(), mb.B, mb.T,
                                              mb.doc_start.empty() ? nullptr : mb.doc_start.data());
    total.sum += loss.sum;
    total.num_tokens += loss.num_tokens;
    // Blocking: the next stage is already waiting for it, and nothing waits on this one.
    if (!last())
      pp_.send(comm::ConstView(model.stage_output()), s + 1,
               kEvaluationTag, {.name = "pipeline activations (evaluation)"});
  }
  model.swap_forward_slot(slots_[slot]);
  free_slots_.push_back(slot);
  double loss[2] = {total.sum, static_cast<double>(total.num_tokens)};
  pp_.all_reduce(comm::MutView(std::span<double>(loss)), comm::ReduceOp::sum, {.name = "pipeline evaluation loss"});
  return {loss[0], static_cast<int64_t>(loss[1])};
}

}  // namespace flotilla::parallel
