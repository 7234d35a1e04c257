// A plan: for one workload, its measured (or estimated) one-rank step, and the machines,
// every strategy's bytes, communication time, step time, speed-up and memory on 1..N ranks,
// and the flowchart's answer — stay on one machine, or which strategy on how many.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flotilla/plan/expert.hpp"
#include "flotilla/plan/mesh.hpp"
#include "flotilla/plan/pipeline.hpp"
#include "flotilla/plan/scaling.hpp"
#include "flotilla/plan/strategy.hpp"
#include "flotilla/plan/tensor.hpp"
#include "flotilla/plan/workload.hpp"

namespace flotilla::plan {

struct PlanRequest {
  Workload workload;
  StepCost cost;       // one rank, alone
  Cluster cluster;
  StrategyKnobs knobs;
  int runs = 1;              // how many times the user will train this (sweeps, reruns)
  double epochs = 1.0;       // one run
  double rows_per_epoch = 0;  // sequences of seq_len in one pass over the training data
  std::string data_description;
  // For the commands the plan prints: the user's own flags for `flotilla train`
  // ("--model M --data D --batch-size 4 --seq-len 128") and the hostfile, if any.
  std::string train_args;
  std::string hostfile;
  double memory_headroom = 0.9;  // a strategy fits when it needs at most this share of memory
  // Pipelines: train's --micro-batches for the pipeline rows (0: the most micro-batches of
  // the batch up to 4 per stage).
  int64_t micro_batches = 0;
};

struct StrategyRow {
  Strategy strategy;
  CommCost comm;                       // at the largest world size
  std::vector<Prediction> weak;        // per world size of PlanResult::ranks
  std::vector<MemoryCost> memory;      // per world size
  // The peak of every rank a machine runs at world size ranks[i] (they share its memory),
  // and whether that is at most the request's share of a machine's memory.
  double host_peak_bytes(size_t i, const PlanRequest& r) const;
  bool fits_at(size_t i, const PlanRequest& r) const;
};

enum class Advice {
  one_machine,
  data_parallel,
  accumulate_or_compress,
  local_sgd,
  sharding,
  tensor_parallel,
  tensor_parallel_sharded,  // dp x tp with ZeRO-3 over the dp replicas of each slice
  pipeline_parallel,
  pipeline_tensor_parallel,
  does_not_fit
};
std::string_view advice_name(Advice a);  // "stay on one machine", "basic data parallel", ...

struct Recommendation {
  Advice advice = Advice::one_machine;
  std::string strategy;   // the row's name ("all-reduce", "accumulate x8"); empty for one machine
  int ranks = 1;
  bool planned = false;   // the strategy is not in this build of flotilla train yet
  std::string reason;     // one line
  std::string command;
  std::vector<std::string> walk;  // the flowchart's questions with this plan's answers
};

struct PlanResult {
  PlanRequest request;
  std::vector<int> ranks;          // world sizes of the tables
  std::vector<StrategyRow> rows;
  std::vector<Prediction> strong;  // plain all-reduce, a fixed global batch
  double serial_fraction = 0;
  double steps_per_epoch_one = 0;  // on one rank
  double epoch_s_one = 0;
  double run_s_one = 0;            // epochs x epoch
  Recommendation recommendation;
  // Pipelines of 2, 4, 8, ... stages up to the ranks and the layers (plan/pipeline.hpp), on
  // the link of that many ranks. Pipelines, tp and pp x tp are recommended when a replica
  // does not fit one machine, where one fits and runs faster than the ZeRO stage that fits.
  std::vector<PipelinePlan> pipelines;
  std::vector<ExpertPlan> experts;  // ep = 2, 4, ...: a mixture-of-experts model only
  // Tensor parallelism, tp = 2, 4, ... up to the ranks, each that splits the model
  // (plan/tensor.hpp), on the link of that many ranks.
  std::vector<TensorPlan> tensors;
  // Pipeline stages of tp groups (plan/mesh.hpp): each pipeline's P with each tp's T, P x T
  // up to the ranks; the tp groups on the link of T ranks, the stages on that of P x T.
  std::vector<MeshPlan> meshes;

  const StrategyRow& row(StrategyKind kind) const;
};

PlanResult make_plan(const PlanRequest& request);
// The flowchart (docs/planning.md), on a plan whose tables are filled.
Recommendation recommend(const PlanResult& plan);

std::string render_text(const PlanResult& plan);
nlohmann::json plan_json(const PlanResult& plan);
// Predicted speed-up (weak scaling) against world size, one line per strategy, and the
// ideal line n.
std::string speedup_chart_svg(const PlanResult& plan);
// dir/plan.json and dir/speedup.svg, atomically.
void write_plan(const std::filesystem::path& dir, const PlanResult& plan);

}  // namespace flotilla::plan
