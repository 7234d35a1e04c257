// What every piece of a training job (train/job_*.hpp, run in order by run_train_job)
// is handed besides the job itself: this process's place among the ranks, and where
// one-off facts go.
#pragma once

#include <functional>
#include <string>

#include "flotilla/train/job.hpp"

namespace flotilla::train {

struct JobRanks {
  bool root = true;  // rank 0: the one that reports and writes
  int rank = 0;
  int world = 1;
  // Which share of each global batch this rank reads: its data-parallel rank among the
  // replicas (every stage of a pipeline reads its replica's rows).
  int data_rank = 0;
  int data_world = 1;
};

inline JobRanks job_ranks(const TrainJob& job) {
  const int data_rank = job.dp ? job.dp->rank() : 0, data_world = job.dp ? job.dp->world() : 1;
  // A pipeline or tensor parallelism: several ranks of one replica; world rank 0 reports.
  if (job.pp || job.tp) return JobRanks{job.world->rank() == 0, job.world->rank(), job.world->size(), data_rank, data_world};
  if (!job.dp) return {};
  return JobRanks{job.dp->is_root(), job.dp->rank(), job.dp->world(), data_rank, data_world};
}

// One-off facts (sizes, memory, warnings) for the user: TrainCallbacks::on_info on rank 0,
// nowhere on the other ranks.
using InfoSink = std::function<void(const std::string&)>;

}  // namespace flotilla::train
