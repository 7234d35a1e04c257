#include "flotilla/train/trainer.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <optional>
#include <thread>

#include "flotilla/base/error.hpp"
#include "flotilla/base/timer.hpp"
#include "flotilla/kernels/kernels.hpp"
#include "flotilla/parallel/deterministic_sync.hpp"
#include "flotilla/parallel/expert_sync.hpp"
#include "flotilla/parallel/pipeline_sync.hpp"

namespace flotilla::train {

void validate_train_config(const TrainConfig& cfg) {
  auto refuse = [](std::string_view flag, std::string_view domain, double value) {
    throw InputError("train", fmt::format("{} must be {}, not {}", flag, domain, value));
  };
  // Negated comparisons: NaN fails every one of them.
  if (!(std::isfinite(cfg.lr) && cfg.lr >= 0.0f)) refuse("--lr", "a finite number >= 0", cfg.lr);
  if (!(std::isfinite(cfg.min_lr) && cfg.min_lr >= 0.0f)) refuse("--min-lr", "a finite number >= 0", cfg.min_lr);
  if (cfg.warmup_steps < 0) refuse("--warmup", "0 or more steps", static_cast<double>(cfg.warmup_steps));
  if (!(std::isfinite(cfg.grad_clip) && cfg.grad_clip >= 0.0f))
    refuse("--grad-clip", "a finite number >= 0 (0: off)", cfg.grad_clip);
  if (!(cfg.adamw.beta1 >= 0.0f && cfg.adamw.beta1 < 1.0f)) refuse("--beta1", "in [0, 1)", cfg.adamw.beta1);
  if (!(cfg.adamw.beta2 >= 0.0f && cfg.adamw.beta2 < 1.0f)) refuse("--beta2", "in [0, 1)", cfg.adamw.beta2);
  if (!(std::isfinite(cfg.adamw.eps) && cfg.adamw.eps > 0.0f)) refuse("AdamW's epsilon", "a finite number > 0", cfg.adamw.eps);
  if (!(std::isfinite(cfg.adamw.weight_decay) && cfg.adamw.weight_decay >= 0.0f))
    refuse("--weight-decay", "a finite number >= 0", cfg.adamw.weight_decay);
  if (cfg.eval_every < 0) refuse("--eval-every", "0 (at the end only) or more steps", static_cast<double>(cfg.eval_every));
  if (!(std::isfinite(cfg.bucket_mb) && cfg.bucket_mb >= 0.0))
    refuse("--bucket-mb", "0 (no overlap) or a positive number of MiB", cfg.bucket_mb);
}

int64_t bounded_eval_batches(const data::SequentialWindowSource& valid, int64_t rows, int64_t T, int64_t requested) {
  const auto windows =
      static_cast<int64_t>(data::SequentialWindowSource::windows_per_pass(valid.stream_tokens(), static_cast<int>(T)));
  const int64_t pass = std::max<int64_t>(1, rows > 0 ? windows / rows : 1);
  return requested > 0 ? std::min(requested, pass) : pass;
}

namespace {

// The gradient sync cfg asks for, after the checks every flag gets.
std::unique_ptr<parallel::GradientSync> make_sync(model::Llama& model, const TrainConfig& cfg,
                                                  parallel::DataParallel* dp, TraceRecorder* trace,
                                                  parallel::PipelineStage* pipeline,
                                                  parallel::ExpertParallel* experts) {
  if (cfg.batch_size <= 0 || cfg.seq_len <= 0 || cfg.grad_accum <= 0 || cfg.steps < 0)
    throw InputError("train", "batch size, sequence length and accumulation steps must be positive");
  validate_train_config(cfg);
  if (cfg.deterministic) {
    if (pipeline) throw InputError("train", "--deterministic does not work with pipeline parallelism (pp > 1) yet");
    // The load-balancing loss is a function of the whole micro-batch's routing, not a sum
    // over its rows.
    if (model.config().is_moe())
      throw InputError("train", "--deterministic does not work with mixture-of-experts models yet: the router's "
                                "load-balancing loss is not a sum over rows");
    const int64_t rows = cfg.batch_size * cfg.grad_accum * (dp ? dp->world() : 1);
    if (rows > parallel::kMaxDeterministicRows)
      throw InputError("train", fmt::format("--deterministic sums at most {} rows per global batch without overflow; "
                                            "this one has {} (--batch-size x --grad-accum x ranks)",
                                            parallel::kMaxDeterministicRows, rows));
    const int64_t G = cfg.deterministic_group;
    if (G < 1) throw InputError("train", fmt::format("--deterministic-group must be 1 or more rows, not {}", G));
    // A group runs as one batch: it must lie inside one micro-batch of one rank.
    if (cfg.balance_every > 0 ? rows % G != 0 : cfg.batch_size % G != 0)
      throw InputError("train", fmt::format("--deterministic-group {} must divide {} ({}): a group of rows runs as one "
                                            "batch on one rank; pass a divisor, or 1 for rows one at a time",
                                            G, cfg.balance_every > 0 ? "the global batch's rows" : "--batch-size",
                                            cfg.balance_every > 0 ? rows : cfg.batch_size));
    if (cfg.balance_every > 0 && rows / G < cfg.grad_accum * (dp ? dp->world() : 1))
      throw InputError("train", fmt::format("--balance with --deterministic-group {} needs a group for each "
                                            "micro-batch of each rank: {} groups are too few",
                                            G, rows / G));
  } else if (cfg.deterministic_group != 1) {
    throw InputError("train", "--deterministic-group applies to --deterministic only");
  }
  if (cfg.balance_every < 0)
    throw InputError("train", fmt::format("--balance-every must be 1 or more steps, not {}", cfg.balance_every));
  if (!(std::isfinite(cfg.test_slow_factor) && cfg.test_slow_factor >= 1.0))
    throw InputError("train", fmt::format("FLOTILLA_TEST_SLOW_RANK's factor must be a finite number >= 1, not {}",
                                          cfg.test_slow_factor));
  if (cfg.balance_every > 0) {
    // Each of these needs every rank's micro-batches alike, or weighs ranks by their own rows.
    if (pipeline)
      throw InputError("train", "--balance does not work with pipeline parallelism (pp > 1): the stages of a "
                                "replica pass fixed-size micro-batches along");
    if (model.config().is_moe())
      throw InputError("train", "--balance does not work with mixture-of-experts models: the router's "
                                "load-balancing loss is a mean over each micro-batch, which the cut would change");
    if (cfg.local_sgd.sync_every > 0)
      throw InputError("train", "--balance does not work with local SGD (--sync-every): each rank steps on the mean "
                                "over its own rows, so unequal shares would weigh the ranks unequally");
  }
  if (pipeline) {
    // A mixture of experts' load-balancing loss is one formula over the layers of the whole
    // model: its statistics travel between the stages (parallel/pipeline.cpp).
    if (cfg.local_sgd.sync_every > 0)
      throw InputError("train", "pipeline parallelism (pp > 1) does not combine with local SGD (--sync-every) yet");
    if (cfg.batch_size % pipeline->config().micro_batches != 0)
      throw InputError("train", fmt::format("--micro-batches {} does not divide --batch-size {}: each micro-batch "
                                            "must have the same number of rows",
                                            pipeline->config().micro_batches, cfg.batch_size));
    return parallel::make_pipeline_sync(model, *pipeline, dp, cfg.zero_stage);
  }
  if (!model.holds_all_experts()) {
    // Each rank holds its own experts (train/job_model.hpp's held_part): their gradients
    // (or their adapters') are summed over their replicas only.
    if (!experts || !dp) throw Error("train", "a model holding part of its experts needs expert parallelism");
    const bool plain = cfg.zero_stage == 0 && cfg.local_sgd.sync_every == 0 &&
                       dp->codec().kind() == comm::Compression::none;
    if (!model.base_frozen() && !plain)
      throw InputError("train", "--zero, --sync-every and --compression do not combine with experts held in part");
    // LoRA with those: every adapter exchanged over the whole data group as without ep
    // (exact; each rank's gradient for another block's experts is zero).
    if (plain) return parallel::make_expert_sync(model, *dp, *experts);
  }
  return parallel::make_gradient_sync(
      model, dp, parallel::SyncConfig{.local_sgd = cfg.local_sgd,
                                       .bucket_mb = cfg.bucket_mb,
                                       .zero_stage = cfg.zero_stage,
                                       .zero_poison = cfg.zero_poison,
                                       .deterministic = cfg.deterministic},
      trace);
}

std::vector<FlatRange> flat_ranges(const std::vector<parallel::ArenaRange>& ranges) {
  std::vector<FlatRange> out;
  for (const parallel::ArenaRange& r : ranges) out.push_back({r.begin, r.end});
  return out;
}

}  // namespace

Trainer::Trainer(model::Llama& model, TrainConfig cfg, parallel::DataParallel* dp, TraceRecorder* trace,
                 parallel::PipelineStage* pipeline, parallel::ExpertParallel* experts)
    : model_(model),
      cfg_(cfg),
      dp_(dp),
      trace_(trace),
      pipeline_(pipeline),
      sync_(make_sync(model, cfg, dp, trace, pipeline, experts)),
      optimizer_(model.trainable().table, cfg.adamw, flat_ranges(sync_->owned())),
      schedule_{cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps} {
  batch_.B = cfg.batch_size;
  batch_.T = cfg.seq_len;
  if (cfg.balance_every > 0)
    balancer_ = std::make_unique<parallel::RowBalancer>(
        dp ? &dp->communicator() : nullptr,
        // In units of deterministic groups (one row each outside the deterministic mode).
        parallel::RowBalanceConfig{.global_rows = cfg.batch_size * cfg.grad_accum * world() / group_rows(),
                                   .min_rows = cfg.grad_accum,  // one group in each micro-batch
                                   .every = cfg.balance_every});
}

Trainer::~Trainer() = default;

void Trainer::complete_model() {
  if (model_.base_frozen()) sync_->complete_weights();
}

std::pair<std::span<float>, std::span<float>> Trainer::whole_moments() {
  if (!sync_->sharded()) return {optimizer_.m(), optimizer_.v()};
  const size_t n = model_.trainable().params.size();
  if (whole_m_.size() != n) {
    whole_m_.resize(n);
    whole_v_.resize(n);
  }
  return {whole_m_.span(), whole_v_.span()};
}

void Trainer::drop_whole_moments() {
  whole_m_ = {};
  whole_v_ = {};
}

void Trainer::restore_progress(int64_t steps_done, double elapsed_s) {
  if (steps_done < 0) throw InputError("train", "cannot resume at a negative step");
  step_ = steps_done;
  elapsed_s_ = elapsed_s;
  if (sync_->sharded() && !whole_m_.empty()) {
    sync_->take_owned(whole_m_.span(), optimizer_.m());
    sync_->take_owned(whole_v_.span(), optimizer_.v());
    drop_whole_moments();
  }
  sync_->weights_restored();
}

std::vector<parallel::RankState> Trainer::rank_state() {
  std::vector<parallel::RankState> state;
  if (dp_ && dp_->world() > 1 && cfg_.local_sgd.sync_every > 0) {
    state.push_back({"optimizer.m", optimizer_.m()});
    state.push_back({"optimizer.v", optimizer_.v()});
  }
  for (parallel::RankState& s : sync_->rank_state()) state.push_back(s);
  return state;
}

EvalMetrics evaluate_loss(model::Llama& model, const std::function<bool(data::Batch&)>& next, int64_t max_batches,
                          parallel::PipelineStage* pipeline) {
  data::Batch batch;
  model::LossSum total;
  model.set_training(false);  // no dropout while measuring
  for (int64_t i = 0; max_batches <= 0 || i < max_batches; ++i) {
    if (!next(batch)) break;
    const model::LossSum loss =
        pipeline ? pipeline->forward_only(model, batch)
                 : model.forward(batch.tokens.data(), batch.targets.data(), batch.B, batch.T,
                                 batch.doc_start.empty() ? nullptr : batch.doc_start.data());
    total.sum += loss.sum;
    total.num_tokens += loss.num_tokens;
  }
  model.set_training(true);
  return EvalMetrics{0, total.mean(), total.num_tokens};
}

model::LossSum Trainer::rows_forward_backward(int64_t first_row) {
  const int64_t T = batch_.T, G = group_rows();
  model::LossSum total;
  for (int64_t b = 0; b < batch_.B; b += G) {
    const size_t at = static_cast<size_t>(b * T);
    // LoRA dropout's masks: keyed by the group's first global row, the same whichever rank
    // runs it.
    model_.set_dropout_step(static_cast<uint64_t>(first_row + b));
    model::LossSum group;
    {
      TraceSpan span(trace_, "forward", TraceLane::compute);
      group = model_.forward(batch_.tokens.data() + at, batch_.targets.data() + at, G, T,
                             batch_.doc_start.empty() ? nullptr : batch_.doc_start.data() + at);
    }
    // A group without targets has a zero gradient: nothing to add.
    if (group.num_tokens == 0) continue;
    {
      TraceSpan span(trace_, "backward", TraceLane::compute);
      model_.backward(1.0f);  // the group's loss sum: no mean over anything
    }
    sync_->row_done(group);
    total.sum += group.sum;
    total.num_tokens += group.num_tokens;
  }
  return total;
}

void Trainer::draw_global_batch(data::BatchSource& train) {
  // The source reads for every rank: grad_accum micro-batches of world x B rows, in the
  // global batch's row order (data/batch_sampler.hpp, data/rank_slice.hpp).
  const int64_t T = cfg_.seq_len, chunk_rows = cfg_.batch_size * world();
  global_batch_.B = chunk_rows * cfg_.grad_accum;
  global_batch_.T = T;
  global_batch_.tokens.clear();
  global_batch_.targets.clear();
  global_batch_.doc_start.clear();
  for (int64_t micro = 0; micro < cfg_.grad_accum; ++micro) {
    batch_.B = chunk_rows;
    batch_.T = T;
    train.next_batch(batch_);
    global_batch_.tokens.insert(global_batch_.tokens.end(), batch_.tokens.begin(), batch_.tokens.end());
    global_batch_.targets.insert(global_batch_.targets.end(), batch_.targets.begin(), batch_.targets.end());
    // Packed rows carry doc_start; plain windows do not (then no chunk does).
    global_batch_.doc_start.insert(global_batch_.doc_start.end(), batch_.doc_start.begin(), batch_.doc_start.end());
  }
}

int64_t Trainer::take_share(int64_t micro) {
  // This rank's rows [first, first + n) of the global batch, cut into grad_accum
  // micro-batches whose sizes differ by at most one (the larger ones first).
  // The balancer counts groups of group_rows() rows (deterministic mode; else rows).
  const int64_t n = balancer_->share(rank()), accum = cfg_.grad_accum, T = cfg_.seq_len, G = group_rows();
  const int64_t base = n / accum, extra = n % accum;
  const int64_t rows = (base + (micro < extra ? 1 : 0)) * G;
  const int64_t first = (balancer_->first_row(rank()) + micro * base + std::min(micro, extra)) * G;
  const auto begin = static_cast<std::ptrdiff_t>(first * T), end = static_cast<std::ptrdiff_t>((first + rows) * T);
  batch_.B = rows;
  batch_.T = T;
  batch_.tokens.assign(global_batch_.tokens.begin() + begin, global_batch_.tokens.begin() + end);
  batch_.targets.assign(global_batch_.targets.begin() + begin, global_batch_.targets.begin() + end);
  if (global_batch_.doc_start.empty())
    batch_.doc_start.clear();
  else
    batch_.doc_start.assign(global_batch_.doc_start.begin() + begin, global_batch_.doc_start.begin() + end);
  return first;
}

StepMetrics Trainer::step(data::BatchSource& train) {
  Timer timer;
  StepMetrics m;
  parallel::Exchanged exchanged;
  int64_t rows_run = 0;         // rows this rank ran forward and backward
  double rows_compute_s = 0.0;  // in this many seconds (row balancing's measure)
  // Draws global batches until one has a target token on some rank (all ranks agree: the
  // count is global). See step() in trainer.hpp for why an empty one is skipped.
  for (;;) {
    sync_->zero_grads();
    model::LossSum window;
    double window_aux = 0.0;  // sum of micro-batches' aux loss x their target tokens
    double window_dropped = 0.0;  // sum of micro-batches' shares of assignments over capacity
    int64_t window_forwards = 0;
    if (pipeline_) {
      // After validation the model ran every layer: back to this stage's.
      model_.set_layer_range(pipeline_->range());
      micro_batches_.clear();
      for (int64_t micro = 0; micro < cfg_.grad_accum; ++micro) {
        batch_.B = cfg_.batch_size;
        batch_.T = cfg_.seq_len;
        Timer data_timer;
        train.next_batch(batch_);
        pipeline_->split(batch_, micro_batches_);
        m.data_s += data_timer.elapsed_s();
      }
      window = pipeline_->run(model_, micro_batches_, trace_);
    }
    if (balancer_) {
      Timer data_timer;
      draw_global_batch(train);
      m.data_s += data_timer.elapsed_s();
    }
    for (int64_t micro = 0; !pipeline_ && micro < cfg_.grad_accum; ++micro) {
      // Index in the global batch of the micro-batch's first row. Without balancing,
      // micro-step a of rank r holds rows [(a * world + r) * B, +B) (data/batch_sampler.hpp,
      // data/rank_slice.hpp); with it, a piece of the rank's share (take_share).
      int64_t first_in_batch = 0;
      {
        Timer data_timer;
        if (balancer_) {
          first_in_batch = take_share(micro);
        } else {
          batch_.B = cfg_.batch_size;
          batch_.T = cfg_.seq_len;
          train.next_batch(batch_);
          first_in_batch = (micro * world() + rank()) * cfg_.batch_size;
        }
        m.data_s += data_timer.elapsed_s();
      }
      rows_run += batch_.B;
      model::LossSum loss;
      double micro_compute_s = 0.0;  // forward and backward of this micro-batch, no waits
      if (sync_->per_row()) {
        const int64_t global_rows = cfg_.batch_size * cfg_.grad_accum * world();
        Timer compute_timer;
        loss = rows_forward_backward((step_ + m.skipped_batches) * global_rows + first_in_batch);
        micro_compute_s = compute_timer.elapsed_s();
      } else {
        double forward_s = 0.0;
        {
          Timer compute_timer;
          TraceSpan span(trace_, "forward", TraceLane::compute);
          loss = model_.forward(batch_.tokens.data(), batch_.targets.data(), batch_.B, batch_.T,
                                batch_.doc_start.empty() ? nullptr : batch_.doc_start.data());
          forward_s = compute_timer.elapsed_s();
        }
        // The slow-rank hook sleeps before backward, for the forward and the backward to come
        // (the last one's share of the two): sleeping after backward would hide behind the
        // buckets' all-reduce, which a slower machine's backward would delay.
        if (cfg_.test_slow_factor > 1.0) {
          const double extra_s = (cfg_.test_slow_factor - 1.0) * forward_s * (1.0 + slow_backward_ratio_);
          std::this_thread::sleep_for(std::chrono::duration<double>(extra_s));
          micro_compute_s += extra_s;
        }
        sync_->before_backward(micro, cfg_.grad_accum);
        {
          Timer compute_timer;
          TraceSpan span(trace_, "backward", TraceLane::compute);
          // Sum of per-token gradients; divided by the token count of the exchange below.
          model_.backward(1.0f);
          const double backward_s = compute_timer.elapsed_s();
          if (forward_s > 0.0) slow_backward_ratio_ = backward_s / forward_s;
          micro_compute_s += forward_s + backward_s;
        }
      }
      if (cfg_.test_slow_factor > 1.0 && sync_->per_row()) {
        // Rows exchange nothing until the step's end: the sleep may follow them.
        const double extra_s = (cfg_.test_slow_factor - 1.0) * micro_compute_s;
        std::this_thread::sleep_for(std::chrono::duration<double>(extra_s));
        micro_compute_s += extra_s;
      }
      rows_compute_s += micro_compute_s;
      if (sync_->per_row()) {
        window.sum += loss.sum;
        window.num_tokens += loss.num_tokens;
        continue;
      }
      sync_->after_backward();
      window.sum += loss.sum;
      window.num_tokens += loss.num_tokens;
      window_aux += model_.router_aux_loss() * static_cast<double>(loss.num_tokens);
      window_dropped += model_.expert_dropped_fraction();
      ++window_forwards;
    }
    if (model_.config().is_moe() && pipeline_) {
      m.router_aux_loss = pipeline_->router_aux_loss();
      m.expert_dropped = pipeline_->expert_dropped();
    } else if (model_.config().is_moe()) {
      m.router_aux_loss = window.num_tokens > 0 ? window_aux / static_cast<double>(window.num_tokens) : 0.0;
      m.expert_dropped = window_forwards > 0 ? window_dropped / static_cast<double>(window_forwards) : 0.0;
    }
    m.compute_s = timer.elapsed_s() - m.data_s - m.sync_s;
    {
      // With overlap, only what backward did not hide: the wait for the last buckets.
      Timer sync_timer;
      // The mode's name only when tracing: no string work in the step otherwise.
      TraceSpan span(trace_, sync_->overlapped() ? "wait for gradient buckets" : "gradient exchange", TraceLane::compute,
                     trace_ ? fmt::format(R"({{"mode":"{}"}})", sync_->name()) : std::string());
      exchanged = sync_->exchange(window);
      m.sync_s += sync_timer.elapsed_s();
    }
    if (exchanged.global.num_tokens > 0) break;
    if (++m.skipped_batches >= kMaxSkippedBatches)
      throw InputError("train", fmt::format("{} global batches in a row held no target token: every example's targets "
                                            "lie past the row of {} tokens; raise --seq-len",
                                            m.skipped_batches, cfg_.seq_len));
  }
  const model::Llama::Trainable trainable = model_.trainable();
  // The gradients of what this rank updates: everything, or its shard under ZeRO.
  const std::span<float> grads = sync_->owned_grads();
  const auto n = static_cast<int64_t>(grads.size());
  Timer update_timer;
  std::optional<TraceSpan> update_span;
  update_span.emplace(trace_, "clip + optimizer", TraceLane::compute);
  if (exchanged.grad_tokens > 0)
    kernels::scale_inplace(grads.data(), n, 1.0f / static_cast<float>(exchanged.grad_tokens));
  // Tensor parallel: the split tensors' squares summed over the tp group; a sharding sync
  // (ZeRO, or a pipeline stage's) does that for its owned gradients, the others own this
  // rank's whole local model.
  const double grad_norm = std::sqrt(model_.tensor_parallel() && !sync_->sharded()
                                         ? model_.grad_sum_squares_tensor_parallel()
                                         : sync_->grad_sum_squares());
  const float lr = schedule_.lr_at(step_);
  const model::LossSum& reported = exchanged.global;
  // The loss and the norm are global after the exchange, so every rank decides alike
  // unless each rank's gradients are its own (local SGD asks the others).
  const bool finite = sync_->agree_finite(std::isfinite(reported.mean()) && std::isfinite(grad_norm));
  if (finite) {
    if (cfg_.grad_clip > 0.0f && grad_norm > cfg_.grad_clip)
      kernels::scale_inplace(grads.data(), n, static_cast<float>(cfg_.grad_clip / grad_norm));
    optimizer_.step(trainable.params, grads, lr);
  } else if (cfg_.on_nonfinite == NonFinitePolicy::stop) {
    m.step = step_ + 1;
    m.total_steps = cfg_.steps;
    m.loss = reported.mean();
    m.lr = lr;
    m.grad_norm = grad_norm;
    // "nan", never "-nan": the sign of a NaN means nothing to the reader.
    auto text = [](double v) { return std::isnan(v) ? std::string("nan") : fmt::format("{}", v); };
    throw NonFiniteStep(fmt::format("step {}: the loss is {} and the gradient norm {}: training diverged", m.step,
                                    text(m.loss), text(m.grad_norm)),
                        m);
  }
  m.skipped = !finite;
  ++step_;
  m.update_s = update_timer.elapsed_s();
  update_span.reset();
  {
    // ZeRO's weight all-gather, local SGD's meetings: communication.
    Timer sync_timer;
    std::optional<TraceSpan> span;
    if (sync_->sharded()) span.emplace(trace_, "weight all-gather", TraceLane::compute);
    sync_->after_update(step_, step_ == cfg_.steps);
    m.sync_s += sync_timer.elapsed_s();
  }
  if (balancer_) {
    m.rank_rows = balancer_->shares();  // this step's, before a new cut
    for (int64_t& r : m.rank_rows) r *= group_rows();
    // A process's first step pays for allocations and first touches: not a speed.
    if (measured_steps_++ > 0) balancer_->record(rows_run, rows_compute_s);
    Timer sync_timer;
    balancer_->after_step(step_);
    if (step_ % cfg_.balance_every == 0) m.rank_rows_per_s = balancer_->speeds();
    m.sync_s += sync_timer.elapsed_s();
  }

  m.step = step_;
  m.total_steps = cfg_.steps;
  m.loss = reported.mean();
  m.lr = lr;
  m.grad_norm = grad_norm;
  m.tokens = cfg_.batch_size * cfg_.seq_len * cfg_.grad_accum * (dp_ ? dp_->world() : 1) * (1 + m.skipped_batches);
  m.step_s = timer.elapsed_s();
  m.tokens_per_s = static_cast<double>(m.tokens) / m.step_s;
  elapsed_s_ += m.step_s;
  m.elapsed_s = elapsed_s_;
  return m;
}

EvalMetrics Trainer::evaluate(data::SequentialWindowSource& valid) {
  valid.reset();
  EvalMetrics e = evaluate_loss(
      model_,
      [&](data::Batch& b) {
        b.B = cfg_.batch_size;
        b.T = cfg_.seq_len;
        valid.next_batch(b);
        return true;
      },
      bounded_eval_batches(valid, cfg_.batch_size, cfg_.seq_len, cfg_.eval_batches), pipeline_);
  e.step = step_;
  return e;
}

void Trainer::run(data::BatchSource& train, data::SequentialWindowSource* valid,
                  const std::function<void(const StepMetrics&)>& on_step,
                  const std::function<void(const EvalMetrics&)>& on_eval,
                  const std::function<void(int64_t step)>& on_step_end,
                  const std::function<bool(int64_t step)>& stop_after) {
  std::function<EvalMetrics()> evaluate_valid;
  if (valid) evaluate_valid = [this, valid] { return evaluate(*valid); };
  run(train, evaluate_valid, on_step, on_eval, on_step_end, stop_after);
}

void Trainer::run(data::BatchSource& train, const std::function<EvalMetrics()>& evaluate,
                  const std::function<void(const StepMetrics&)>& on_step,
                  const std::function<void(const EvalMetrics&)>& on_eval,
                  const std::function<void(int64_t step)>& on_step_end,
                  const std::function<bool(int64_t step)>& stop_after) {
  while (step_ < cfg_.steps) {
    const StepMetrics m = step(train);
    if (on_step) on_step(m);
    const bool last = step_ == cfg_.steps;
    if (evaluate && (last || (cfg_.eval_every > 0 && step_ % cfg_.eval_every == 0))) {
      EvalMetrics e = evaluate();
      e.step = step_;
      if (on_eval) on_eval(e);
    }
    if (on_step_end) on_step_end(step_);
    if (stop_after && step_ < cfg_.steps && stop_after(step_)) break;
  }
  // What follows a run reads the whole model (the test split, the saved model).
  complete_model();
}

}  // namespace flotilla::train
