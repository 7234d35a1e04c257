#include "flotilla/train/job_loop.hpp"

#include <functional>
#include <span>
#include <string>
#include <string_view>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "flotilla/base/error.hpp"
#include "flotilla/base/stop_signal.hpp"
#include "flotilla/parallel/tensor_parallel.hpp"

namespace flotilla::train {

void run_training_loop(const TrainJob& job, const JobRanks& ranks, Trainer& trainer, TrainData& data,
                       JobCheckpoints& checkpoints, RunRecord& record, const TrainCallbacks& callbacks,
                       const InfoSink& info) {
  const int64_t T = job.train.seq_len;
  TrainSummary& summary = record.summary;
  // The ledger of examples: each step line says where in the data's order its global batch
  // began and where the next one begins, as [epoch, position] of the batch sampler
  // ("examples": [[e, p], [e', p']]), so a run's metrics.jsonl shows that no example was
  // skipped or seen twice, across restarts and world sizes too. Streams of random windows
  // (plain text) have no order to show.
  const auto cursor = [&]() -> nlohmann::json {
    const nlohmann::json st = data.train->state();
    if (!st.is_object() || st.value("kind", "") != "batch_sampler") return nullptr;
    return nlohmann::json::array({st.at("epoch"), st.at("position")});
  };
  nlohmann::json batch_begin = cursor();
  const auto on_step = [&](const StepMetrics& m) {
    if (!record.have_first_loss && !m.skipped) {
      summary.first_loss = m.loss;
      record.have_first_loss = true;
    }
    if (!m.skipped) summary.final_loss = m.loss;
    summary.skipped_batches += m.skipped_batches;
    if (m.skipped_batches > 0)
      info(fmt::format("step {}: skipped {} batch{} with no target token (their examples' targets lie past "
                       "--seq-len {}): no optimizer step on {}",
                       m.step, m.skipped_batches, m.skipped_batches == 1 ? "" : "es", T,
                       m.skipped_batches == 1 ? "it" : "them"));
    summary.elapsed_s = m.elapsed_s;
    nlohmann::json batch_end = cursor();
    record.add_step(m, batch_begin.is_null() ? nlohmann::json(nullptr)
                                             : nlohmann::json{{"examples", {batch_begin, batch_end}}});
    batch_begin = std::move(batch_end);
    if (callbacks.on_step) callbacks.on_step(m);
  };
  const auto on_eval = [&](const EvalMetrics& e) {
    summary.final_valid_loss = e.loss;
    record.add_eval(e);
    if (callbacks.on_eval) callbacks.on_eval(e);
  };
  // A stop signal on any rank stops every rank after the same step.
  int stop_signal = 0;
  const auto stop_after = [&](int64_t step) {
    const int local = stop_signal_received();
    if (job.pp || job.tp) {
      int64_t any = local;
      job.world->all_reduce(comm::MutView(std::span<int64_t>(&any, 1)), comm::ReduceOp::max, {.name = "stop signal"});
      stop_signal = static_cast<int>(any);
    } else {
      stop_signal = job.dp ? static_cast<int>(job.dp->max_over_ranks(local, "stop signal")) : local;
    }
    // Local SGD: the ranks' weights meet every H steps only, and a checkpoint must fall on
    // a meeting: run on to the next one (the request stays set on the rank that got it).
    const int64_t H = job.train.local_sgd.sync_every;
    return stop_signal != 0 && (!job.dp || H <= 0 || step % H == 0);
  };
  // Tensor parallelism counts the bytes of training steps only: validation runs uncounted.
  std::function<EvalMetrics()> evaluate = data.evaluate;
  if (evaluate && job.tp)
    evaluate = [&job, inner = data.evaluate] {
      job.tp->set_counting(false);
      try {
        EvalMetrics e = inner();
        job.tp->set_counting(true);
        return e;
      } catch (...) {
        job.tp->set_counting(true);
        throw;
      }
    };
  try {
    trainer.run(*data.train, evaluate, on_step, on_eval,
                [&](int64_t step) { checkpoints.after_step(step); },
                job.stop_on_signal ? std::function<bool(int64_t)>(stop_after) : nullptr);
  } catch (const NonFiniteStep& e) {
    // Nothing of the step was applied; the checkpoints on disk are all from finite steps.
    record.add_step(e.metrics());
    if (ranks.root) record.write_metrics();
    throw RunStopped("train",
                     fmt::format("{}; stopped without writing the model ({}); lower --lr, or pass --on-nonfinite skip "
                                 "to skip such steps",
                                 std::string_view(e.what()).substr(std::string_view("[train] ").size()),
                                 checkpoints.kept_after_failed_step()),
                     1, !ranks.root);
  }
  if (trainer.steps_done() < job.train.steps) {
    // Stopped by a signal: a checkpoint to resume from, then a non-zero exit.
    const int64_t step = trainer.steps_done();
    const std::string where = checkpoints.save_on_stop(step);
    throw RunStopped("train",
                     fmt::format("stopped by {} after step {} of {}; {}; continue with the same command and --resume",
                                 stop_signal_name(stop_signal), step, job.train.steps, where),
                     128 + stop_signal, !ranks.root);
  }
}

}  // namespace flotilla::train
