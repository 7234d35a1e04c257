// What a training job records as it runs: metrics.jsonl (a JSON line per step and per
// validation), the summary it returns, and at the end the run report (report.json and
// loss.svg, train/report.hpp) drawn from them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "flotilla/train/job.hpp"
#include "flotilla/train/trainer.hpp"

namespace flotilla::train {

struct RunRecord {
  std::filesystem::path metrics_path;  // OUT/metrics.jsonl
  std::string metrics;  // JSON lines, written with each checkpoint and with the model at the end
  TrainSummary summary;
  bool have_first_loss = false;

  // Its line only; `extra`'s keys (an object, or null for none) are added to it.
  void add_step(const StepMetrics& m, const nlohmann::json& extra = nullptr);
  void add_eval(const EvalMetrics& e);  // its line only
  // A resumed run keeps the history of the steps it does not repeat: the lines of the
  // earlier metrics.jsonl up to and including `step` (lines it cannot read are dropped),
  // and the first loss in them.
  void continue_from(int64_t step);
  void write_metrics() const;  // metrics.jsonl, atomically
};

// report.json and loss.svg in job.out_dir: the numbers and the loss curves of the whole run
// (resumed history included). Fills record.summary.gradient_bytes_per_step.
void write_report(const TrainJob& job, const nlohmann::json& config, const Trainer& trainer, RunRecord& record,
                  int world);

}  // namespace flotilla::train
