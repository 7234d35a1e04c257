#include "flotilla/train/job_record.hpp"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <optional>
#include <string_view>
#include <vector>

#include "flotilla/base/file.hpp"
#include "flotilla/parallel/pipeline.hpp"
#include "flotilla/parallel/tensor_parallel.hpp"
#include "flotilla/train/report.hpp"

namespace flotilla::train {
namespace {

// JSON has no NaN or Inf: a non-finite value is written as null (and read as "no value").
nlohmann::json finite_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

nlohmann::json step_json(const StepMetrics& m) {
  nlohmann::json j = {{"step", m.step},     {"loss", finite_or_null(m.loss)},         {"lr", m.lr},
          {"grad_norm", finite_or_null(m.grad_norm)}, {"tokens", m.tokens}, {"tokens_per_s", m.tokens_per_s},
          {"elapsed_s", m.elapsed_s}, {"step_s", m.step_s}, {"data_s", m.data_s},
          {"compute_s", m.compute_s}, {"sync_s", m.sync_s}, {"update_s", m.update_s}};
  if (m.skipped) j["skipped"] = true;
  if (m.router_aux_loss) j["router_aux_loss"] = finite_or_null(*m.router_aux_loss);
  if (m.expert_dropped) j["expert_dropped"] = *m.expert_dropped;
  if (!m.rank_rows.empty()) j["rank_rows"] = m.rank_rows;
  if (!m.rank_rows_per_s.empty()) j["rank_rows_per_s"] = m.rank_rows_per_s;
  return j;
}

// The lines of an earlier metrics.jsonl up to and including `step`, and every event line
// `flotilla launch` wrote (an "event" key, no step): a resumed run keeps the history of
// the steps it does not repeat and of its restarts. Lines it cannot read are dropped.
std::string metrics_up_to(const std::filesystem::path& path, int64_t step) {
  if (!std::filesystem::is_regular_file(path)) return {};
  const std::string text = read_text_file(path);
  std::string kept;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + begin, end - begin);
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && ((j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step) ||
                          (!j.contains("step") && j.contains("event"))))
      kept.append(line).push_back('\n');
    begin = end + 1;
  }
  return kept;
}

// The training loss of the first step line of metrics.jsonl text.
std::optional<double> first_loss_of(const std::string& metrics) {
  size_t begin = 0;
  while (begin < metrics.size()) {
    size_t end = metrics.find('\n', begin);
    if (end == std::string::npos) end = metrics.size();
    const nlohmann::json j = nlohmann::json::parse(metrics.substr(begin, end - begin), nullptr, false);
    if (j.is_object() && j.contains("loss") && j["loss"].is_number()) return j["loss"].get<double>();
    begin = end + 1;
  }
  return std::nullopt;
}

}  // namespace

void RunRecord::add_step(const StepMetrics& m, const nlohmann::json& extra) {
  nlohmann::json j = step_json(m);
  if (extra.is_object()) j.update(extra);
  metrics += j.dump() + "\n";
}

void RunRecord::add_eval(const EvalMetrics& e) {
  metrics += nlohmann::json{{"step", e.step}, {"valid_loss", finite_or_null(e.loss)}, {"valid_tokens", e.tokens}}
                 .dump() +
             "\n";
}

void RunRecord::continue_from(int64_t step) {
  metrics = metrics_up_to(metrics_path, step);
  if (const std::optional<double> first = first_loss_of(metrics)) {
    summary.first_loss = *first;
    have_first_loss = true;
  }
}

void RunRecord::write_metrics() const { write_file_atomic(metrics_path, metrics); }

void write_report(const TrainJob& job, const nlohmann::json& config, const Trainer& trainer, RunRecord& record,
                  int world) {
  const std::string& metrics = record.metrics;
  TrainSummary& summary = record.summary;
  LossCurves curves;
  size_t begin = 0;
  while (begin < metrics.size()) {
    size_t end = metrics.find('\n', begin);
    if (end == std::string::npos) end = metrics.size();
    const nlohmann::json j = nlohmann::json::parse(metrics.substr(begin, end - begin), nullptr, false);
    // null (a non-finite value, a skipped step) is no point on the curve.
    if (j.is_object() && j.contains("step") && j["step"].is_number()) {
      const auto step = j["step"].get<double>();
      if (j.contains("loss") && j["loss"].is_number()) curves.train.emplace_back(step, j["loss"].get<double>());
      if (j.contains("valid_loss") && j["valid_loss"].is_number())
        curves.valid.emplace_back(step, j["valid_loss"].get<double>());
    }
    begin = end + 1;
  }
  nlohmann::json report = {{"steps", summary.steps},
                           {"first_loss", summary.first_loss},
                           {"final_loss", summary.final_loss},
                           {"elapsed_s", summary.elapsed_s},
                           {"peak_rss_bytes", summary.peak_rss_bytes},
                           {"dtype", summary.dtype},
                           {"skipped_batches_without_targets", summary.skipped_batches},
                           {"ranks", world},
                           {"config", config}};
  report["fine_tune_type"] = job.fine_tune == FineTuneType::lora ? "lora" : "full";
  if (job.fine_tune == FineTuneType::lora) {
    std::vector<std::string> targets;
    for (const model::LoraTarget t : job.lora.targets) targets.emplace_back(model::lora_target_module(t));
    report["lora"] = {{"rank", job.lora.rank},       {"alpha", job.lora.alpha},
                      {"dropout", job.lora.dropout}, {"targets", targets},
                      {"num_layers", job.lora.num_layers < 0 ? nlohmann::json("all") : nlohmann::json(job.lora.num_layers)}};
  }
  if (!job.flotilla_version.empty()) report["flotilla_version"] = job.flotilla_version;
  if (!job.command_line.empty()) report["command_line"] = job.command_line;
  {
    const std::time_t now = std::time(nullptr);
    std::tm utc{};
    gmtime_r(&now, &utc);
    char date[32];
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &utc);
    report["date"] = date;
  }
  if (job.dp) {
    // What this rank sent per optimizer step of this run: gradients (and ZeRO's weight
    // shards), or local SGD's weights.
    const comm::GradientCodec& codec = job.dp->codec();
    const parallel::GradientSync& sync = trainer.sync();
    const int64_t run_steps = summary.steps - std::max<int64_t>(0, summary.resumed_from_step);
    summary.gradient_bytes_per_step =
        run_steps > 0 ? static_cast<double>(sync.bytes_sent()) / static_cast<double>(run_steps) : 0.0;
    report["gradient_bytes_per_step"] = summary.gradient_bytes_per_step;
    report["gradient_sync"] = sync.name();
    if (job.train.zero_stage > 0) report["zero_stage"] = job.train.zero_stage;
    if (job.train.local_sgd.sync_every > 0) {
      report["local_sgd"] = {{"sync_every", job.train.local_sgd.sync_every},
                             {"outer_lr", job.train.local_sgd.outer_lr},
                             {"outer_momentum", job.train.local_sgd.outer_momentum},
                             {"meetings", sync.exchanges()}};
    } else {
      report["gradient_compression"] = comm::compression_name(codec.kind());
      if (const comm::OverlappedAllReduce* overlap = job.dp->overlap()) {
        report["fusion_buckets"] = overlap->buckets().size();
        report["exposed_gradient_wait_s"] = overlap->exposed_s();
      }
    }
  }
  if (job.experts && job.experts->ep_size() > 1) {
    // Rank 0's row exchanges (dispatch and combine, forward and backward) per step.
    const int64_t run_steps = summary.steps - std::max<int64_t>(0, summary.resumed_from_step);
    report["expert_parallel"] = {
        {"ep", job.experts->ep_size()},
        {"row_exchanges", job.experts->exchanges()},
        {"expert_bytes_per_step",
         run_steps > 0 ? static_cast<double>(job.experts->bytes_sent()) / static_cast<double>(run_steps) : 0.0}};
  }
  // What this rank sent per step of this run besides gradients: activations and their
  // gradients between pipeline stages (point to point), tensor parallelism's all-reduces,
  // all-gathers and reduce-scatters (ring formulas, comm/wire_bytes.hpp), expert rows; and
  // everything together with the gradients.
  const int64_t counted_steps = summary.steps - std::max<int64_t>(0, summary.resumed_from_step);
  const auto per_step = [&](double bytes) { return counted_steps > 0 ? bytes / static_cast<double>(counted_steps) : 0.0; };
  double sent_per_step = job.dp ? summary.gradient_bytes_per_step : 0.0;
  if (job.experts && job.experts->ep_size() > 1) sent_per_step += per_step(static_cast<double>(job.experts->bytes_sent()));
  if (job.tp) {
    const double tp_bytes = per_step(static_cast<double>(job.tp->bytes_sent()));
    sent_per_step += tp_bytes;
    report["tensor_parallel"] = {{"tp", job.tp->tp_size()},
                                 {"sequence_parallel", job.sequence_parallel},
                                 {"activation_bytes_per_step", tp_bytes},
                                 {"activation_all_reduces", job.tp->all_reduces()}};
  }
  if (job.pp) {
    sent_per_step += per_step(static_cast<double>(trainer.pipeline()->bytes_sent()));
    // Rank 0's view: it is stage 0 (its slots are the most any stage holds under 1F1B).
    std::vector<std::vector<int64_t>> layers;
    const parallel::PipelineStage* stage = trainer.pipeline();
    for (const parallel::StageRange& r : stage->ranges()) layers.push_back({r.begin, r.end});
    report["pipeline"] = {{"stages", job.pp->size()},
                          {"layers", layers},
                          {"micro_batches", job.pipeline.micro_batches},
                          {"schedule", parallel::pipeline_schedule_name(job.pipeline.schedule)},
                          {"stage0_activation_slots", stage->peak_slots()},
                          {"p2p_bytes_per_step", per_step(static_cast<double>(stage->bytes_sent()))}};
  }
  report["bytes_sent_per_step"] = sent_per_step;
  if (summary.test_loss >= 0) {
    report["test_loss"] = summary.test_loss;
    report["test_perplexity"] = std::exp(summary.test_loss);
    report["test_tokens"] = summary.test_tokens;
  }
  if (summary.final_valid_loss >= 0) {
    report["final_valid_loss"] = summary.final_valid_loss;
    report["final_valid_perplexity"] = std::exp(summary.final_valid_loss);
  }
  write_run_report(job.out_dir, report, curves);
}

}  // namespace flotilla::train
